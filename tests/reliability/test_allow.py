"""Client allow-lists (``?allow=`` on a bind spec): real masters, clients bound to chosen sources.

Loopback is all of 127.0.0.0/8, so a client socket bound to 127.0.0.2 before connect() or
sendto() reaches the master from that address: the allowed source is 127.0.0.2, the refused one
127.0.0.1, and the app (tests/reliability/allow_app.py) refuses 127.0.0.3 on its own and
records every client its ``verify_request`` is asked about.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from prefork import allowlist
from prefork.allowlist import REPORT_INTERVAL, AllowList, guard
from prefork.bindspec import parse_bind
from prefork.config import load
from prefork.servers import TCPServer
from tests.integration.apps import StreamHandler
from tests.support import SOCKET_TIMEOUT, wait_until

pytestmark = pytest.mark.reliability

APP = "tests.reliability.allow_app"
ALLOWED, REFUSED, APP_REFUSES = "127.0.0.2", "127.0.0.1", "127.0.0.3"
# What the error log says for each (rate-limited) refusal.
REFUSAL_LOG = "not in the listener's allow list"
# Connections a scanning client makes in the rate-limit test: many more than log lines allowed.
SCAN = 40


# -- clients -----------------------------------------------------------------------------------


def tcp_exchange(address: Any, source: str, line: bytes = b"hello") -> bytes:
    """Connect from *source*, send a line, return the reply line; b"" if the server closed first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.bind((source, 0))
        sock.connect((_ipv4(address[0]), address[1]))
        data = b""
        try:
            sock.sendall(line + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return b""
                data += chunk
        except ConnectionResetError:
            return b""  # closed with our line unread: refused all the same
        return data[:-1]


def udp_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(SOCKET_TIMEOUT)
    sock.bind((source, 0))
    return sock


def _ipv4(host: str) -> str:
    """The IPv4 address of *host*, also when it is IPv4-mapped IPv6 (a dual-stack listener's name)."""
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def app_log(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def access_outcomes(path: Path, count: int) -> list[tuple[str, str]]:
    """(client host, outcome) of the access log's lines, once it has *count* of them."""
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= count,
               message=f"expected {count} access log lines in {path}")
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(row[1].rpartition(":")[0], row[-1]) for row in rows]


# -- real masters ------------------------------------------------------------------------------


def test_tcp_allow_list_closes_refused_connections_before_the_app_hears_of_them(start_master, tmp_path):
    verified, access = tmp_path / "verify.log", tmp_path / "access.log"
    master = start_master(app=APP, bind=["tcp://127.0.0.1:0?allow=127.0.0.2/31"], workers=1,
                          env={"ALLOW_APP_LOG": str(verified)}, access_log=str(access))
    address = master.address()
    assert tcp_exchange(address, ALLOWED) == b"hello"
    assert tcp_exchange(address, REFUSED) == b""
    assert tcp_exchange(address, APP_REFUSES) == b""  # admitted by the list, refused by the app
    assert tcp_exchange(address, ALLOWED) == b"hello"
    # The app's verify_request ran for the admitted clients only, in order.
    assert app_log(verified) == [ALLOWED, APP_REFUSES, ALLOWED]
    assert access_outcomes(access, 4) == [(ALLOWED, "ok"), (REFUSED, "refused"), (APP_REFUSES, "refused"),
                                          (ALLOWED, "ok")]
    wait_until(lambda: f"refused {REFUSED}:" in master.log(), message=master.log())
    assert master.workers()[0].requests == 2  # the handler served the two allowed clients only


def test_udp_allow_list_drops_refused_datagrams(start_master, tmp_path):
    verified = tmp_path / "verify.log"
    master = start_master(app=APP, bind=["udp://127.0.0.1:0?allow=127.0.0.2/31"], workers=1,
                          env={"ALLOW_APP_LOG": str(verified)})
    address = master.address()
    with udp_socket(REFUSED) as refused, udp_socket(APP_REFUSES) as app_refused, udp_socket(ALLOWED) as allowed:
        refused.sendto(b"hello", address)
        app_refused.sendto(b"hello", address)
        allowed.sendto(b"hello", address)
        assert allowed.recv(65536) == b"hello"
        # One worker reads one socket's queue in order: the first two were handled (dropped)
        # before the third was answered, and a reply on loopback is queued when it is sent.
        for dropped in (refused, app_refused):
            dropped.setblocking(False)
            with pytest.raises(BlockingIOError):
                dropped.recv(65536)
    assert app_log(verified) == [APP_REFUSES, ALLOWED]
    wait_until(lambda: f"refused {REFUSED}:" in master.log(), message=master.log())


def test_ipv4_networks_admit_ipv4_mapped_peers_of_a_dual_stack_socket(start_master, tmp_path):
    verified = tmp_path / "verify.log"
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as dual:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::ffff:127.0.0.1", 0))  # dual stack, on loopback only
        dual.listen()
        fd = dual.fileno()
        master = start_master(app=APP, bind=[f"fd://{fd}?allow={ALLOWED}/32"], workers=1, pass_fds=(fd,),
                              env={"ALLOW_APP_LOG": str(verified)})
    address = master.address()
    assert ipaddress.IPv6Address(address[0]).ipv4_mapped == ipaddress.IPv4Address("127.0.0.1")
    assert tcp_exchange(address, ALLOWED) == b"hello"
    assert tcp_exchange(address, REFUSED) == b""
    assert app_log(verified) == [f"::ffff:{ALLOWED}"]  # the peer was seen as IPv6, admitted by an IPv4 network


def test_an_allow_list_on_an_inherited_unix_socket_stops_the_master_with_exit_4(start_master):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        master = start_master(app=APP, bind=[f"fd://{theirs.fileno()}?allow=127.0.0.0/8"], ready=False,
                              pass_fds=(theirs.fileno(),))
        assert master.wait_exit() == 4
    assert "allow= needs a TCP or UDP socket" in master.log()


def test_refusals_are_logged_at_a_bounded_rate(start_master, tmp_path):
    access = tmp_path / "access.log"
    master = start_master(app=APP, bind=[f"tcp://127.0.0.1:0?allow={ALLOWED}/32"], workers=1,
                          env={"ALLOW_APP_LOG": str(tmp_path / "verify.log")}, access_log=str(access))
    address = master.address()
    started = time.monotonic()
    for _ in range(SCAN):
        assert tcp_exchange(address, REFUSED) == b""
    elapsed = time.monotonic() - started
    assert tcp_exchange(address, ALLOWED) == b"hello"
    assert [outcome for _, outcome in access_outcomes(access, SCAN + 1)].count("refused") == SCAN
    lines = [line for line in master.log().splitlines() if REFUSAL_LOG in line]
    assert 1 <= len(lines) <= 1 + int(elapsed // REPORT_INTERVAL), lines


# -- the parts, without processes ---------------------------------------------------------------


def _networks(text: str) -> Any:
    return parse_bind(f"tcp://127.0.0.1:0?allow={text}").allow


@pytest.mark.parametrize("networks, peer, admitted", [
    ("10.0.0.0/8", ("10.255.0.1", 5), True),
    ("10.0.0.0/8", ("11.0.0.1", 5), False),
    ("10.0.0.0/8", ("::ffff:10.1.2.3", 5, 0, 0), True),  # IPv4-mapped, dual-stack socket
    ("10.0.0.0/8", ("::ffff:11.1.2.3", 5, 0, 0), False),
    ("10.0.0.0/8", ("::a00:1", 5, 0, 0), False),  # IPv4-compatible is not mapped
    ("0.0.0.0/0", ("1.2.3.4", 5), True),
    ("0.0.0.0/0", ("::1", 5, 0, 0), False),
    ("::/0", ("1.2.3.4", 5), False),
    ("2001:db8::/32", ("2001:db8:ffff::1", 5, 0, 0), True),
    ("2001:db8::/32", ("2001:db9::1", 5, 0, 0), False),
    ("fe80::/10", ("fe80::1%lo", 5, 0, 1), True),  # a zone is not part of the address
    ("::ffff:10.0.0.0/104", ("::ffff:10.9.9.9", 5, 0, 0), True),
    ("127.0.0.1,10.0.0.0/8,192.168.0.0/16", ("192.168.3.4", 5), True),
    ("127.0.0.1,10.0.0.0/8,192.168.0.0/16", ("127.0.0.2", 5), False),
    ("127.0.0.0/8", "", False),  # a Unix peer
    ("127.0.0.0/8", "/run/client.sock", False),
    ("127.0.0.0/8", ("not-an-address", 5), False),
    ("127.0.0.0/8", None, False),
])
def test_allow_list_admits_peers_in_its_networks_only(networks: str, peer: Any, admitted: bool) -> None:
    assert AllowList(_networks(networks)).admits(peer) is admitted


class _Server:
    """Stands in for a server: counts the calls of its own verify_request."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.asked.append(client_address)
        return client_address[0] != "10.0.0.9"


def test_guard_runs_the_servers_own_check_for_admitted_clients_only() -> None:
    server = _Server()
    guard(server, _networks("10.0.0.0/8"), "tcp://0.0.0.0:80")
    assert server.verify_request(None, ("10.0.0.1", 1)) is True
    assert server.verify_request(None, ("10.0.0.9", 1)) is False
    assert server.verify_request(None, ("192.0.2.1", 1)) is False
    assert server.asked == [("10.0.0.1", 1), ("10.0.0.9", 1)]


def test_no_allow_list_leaves_the_server_untouched() -> None:
    server = TCPServer(("127.0.0.1", 0), StreamHandler, bind_and_activate=False)
    try:
        guard(server, (), "tcp://127.0.0.1:0")
        assert "verify_request" not in vars(server)  # no wrapper: nothing is paid per request
    finally:
        server.server_close()


def test_refusal_reports_are_bounded_and_count_what_they_left_out(caplog) -> None:
    now = [100.0]
    server = _Server()
    guard(server, _networks("10.0.0.0/8"), "tcp://0.0.0.0:80", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="prefork.allowlist"):
        for i in range(1000):
            now[0] = 100.0 + i * (REPORT_INTERVAL / 2000)  # a scan within half an interval
            server.verify_request(None, ("192.0.2.1", i))
        now[0] = 100.0 + REPORT_INTERVAL
        server.verify_request(None, ("192.0.2.2", 7))
    messages = [r.getMessage() for r in caplog.records if r.name == allowlist.log.name]
    assert messages == [
        "refused 192.0.2.1:0 on tcp://0.0.0.0:80: not in the listener's allow list",
        "refused 192.0.2.2:7 on tcp://0.0.0.0:80: not in the listener's allow list "
        "(999 more refused since the last report)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_allow_lists_survive_the_comma_separated_environment(tmp_path) -> None:
    environ = {"PREFORK_BIND": "tcp://0.0.0.0:80?allow=10.0.0.0/8,::1, udp://0.0.0.0:53?allow=192.0.2.0/24,"
                               "127.0.0.1:9000,unix:/run/x.sock"}
    settings, sources = load([], environ, str(tmp_path))
    assert settings.bind == ["tcp://0.0.0.0:80?allow=10.0.0.0/8,::1", "udp://0.0.0.0:53?allow=192.0.2.0/24",
                             "127.0.0.1:9000", "unix:/run/x.sock"]
    assert sources["bind"] == "env PREFORK_BIND"
