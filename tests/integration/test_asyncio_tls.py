"""TLS and the PROXY protocol in mode asyncio (issue 15), on asyncio's loop and on uvloop, in real masters.

The edge cases every mode shares (a plaintext client, a stalled handshake, PROXY v1 and v2, a
header from a stranger, garbage, a truncated header, PROXY then TLS, the rotation under load)
run on sync and asyncio workers alike in test_tls.py. Here: what asyncio mode adds or must
prove on its own (mutual TLS with what a handler is given, a Unix listener, the rate limit of
the failure lines, the loop's exception handler, a stop that a stalled handshake cannot hold).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from prefork.errors import EXIT_OK
from prefork.parking import REPORT_INTERVAL
from tests.integration.conftest import Master
from tests.integration.test_tls import closed_by_server, connect, echo, proxy_v1, read_until, tls_echo, wait_log
from tests.support import SOCKET_TIMEOUT, Certs, require_tool, wait_until

pytestmark = pytest.mark.integration

LOOPS = ["asyncio", "uvloop"]
AIO_APPS = "tests.integration.aio_apps"
# A handshake or PROXY header not done in this long is closed.
HANDSHAKE_TIMEOUT = 0.5
# Bad clients sent in a row to see the failure lines limited.
BAD_CLIENTS = 50


def lines_with(master: Master, *words: str) -> list[str]:
    return [line for line in master.log().splitlines() if all(w in line for w in words)]


def wait_access(path: Path, *words: str) -> list[str]:
    """The access log's lines, once one has all *words* (workers write it within a second)."""
    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []
    return wait_until(lambda: any(all(w in line for w in words) for line in lines()) and lines(), 10,
                      message=f"no access line with {words} in {path}")


# -- mutual TLS: what a handler is given ------------------------------------------------------------


@pytest.fixture(params=LOOPS)
def mutual(request: pytest.FixtureRequest, start_master: Any, sock_dir: Path, certs: Certs) -> Master:
    """One asyncio worker (TLSInfo) with client certificates required, on TCP and on a Unix socket."""
    master: Master = start_master(app=f"{AIO_APPS}:tls_info", mode="asyncio", loop=request.param, workers=1,
                                  bind=["tcp://127.0.0.1:0?tls", f"unix:{sock_dir / 'tls.sock'}?tls"],
                                  certfile=str(certs.server[0]), keyfile=str(certs.server[1]), ca_certs=str(certs.ca),
                                  cert_reqs="required", handshake_timeout=HANDSHAKE_TIMEOUT,
                                  access_log=str(sock_dir / "access.log"))
    return master


def test_mutual_tls_serves_a_good_certificate_and_the_handler_sees_it(mutual: Master, certs: Certs,
                                                                      sock_dir: Path) -> None:
    context = certs.client_context(certs.client)
    with context.wrap_socket(connect(mutual, 0), server_hostname="127.0.0.1") as sock:
        seen = json.loads(sock.makefile("rb").readline())
        assert echo(sock, b"then lines") == b"then lines"
        cipher = sock.cipher()
    assert cipher is not None and seen["version"] == "TLSv1.3" and seen["cipher"] == cipher[0], seen
    assert "client@example.com" in seen["peer"] and seen["client"][0] == "127.0.0.1", seen
    wait_access(sock_dir / "access.log", mutual.info["listeners"][0], " ok ", f"tls=TLSv1.3/{seen['cipher']}")


def test_mutual_tls_refuses_a_missing_certificate_with_one_line_and_serves_on(mutual: Master, certs: Certs) -> None:
    host, port = mutual.address(0)
    openssl = [require_tool("openssl"), "s_client", "-brief", "-connect", f"{host}:{port}", "-CAfile", str(certs.ca)]
    refused = subprocess.run(openssl, input=b"no certificate\n", capture_output=True, timeout=SOCKET_TIMEOUT)
    assert b"no certificate" not in refused.stdout, refused.stdout
    wait_log(mutual, "TLS handshake failed", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    with subprocess.Popen([*openssl, "-cert", str(certs.client[0]), "-key", str(certs.client[1])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as served:
        assert served.stdin is not None and served.stdout is not None
        try:
            served.stdin.write(b"with a certificate\n")
            served.stdin.flush()
            assert b"with a certificate\n" in read_until(served.stdout, b"with a certificate\n")
            served.stdin.close()
            assert served.wait(SOCKET_TIMEOUT) == 0
        finally:
            if served.poll() is None:
                served.kill()
    assert len(lines_with(mutual, "TLS handshake failed")) == 1, mutual.log()
    assert "Traceback" not in mutual.log()


def test_a_unix_listener_serves_tls(mutual: Master, certs: Certs) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(SOCKET_TIMEOUT)
    raw.connect(mutual.address(1))
    with certs.client_context(certs.client).wrap_socket(raw, server_hostname="localhost") as sock:
        seen = json.loads(sock.makefile("rb").readline())
        assert echo(sock, b"over a unix socket") == b"over a unix socket"
    assert seen["version"] == "TLSv1.3" and "client@example.com" in seen["peer"], seen


# -- failures: one line per kind, the worker goes on --------------------------------------------------


@pytest.fixture(params=LOOPS)
def echo_edge(request: pytest.FixtureRequest, start_master: Any, certs: Certs) -> Master:
    """One asyncio echo worker: ?tls and ?proxy."""
    master: Master = start_master(app="workers.echo", mode="asyncio", loop=request.param, workers=1,
                                  bind=["tcp://127.0.0.1:0?tls", "tcp://127.0.0.1:0?proxy"],
                                  certfile=str(certs.server[0]), keyfile=str(certs.server[1]),
                                  handshake_timeout=HANDSHAKE_TIMEOUT)
    return master


def send_and_wait_closed(master: Master, index: int, data: bytes) -> None:
    with connect(master, index) as sock:
        sock.sendall(data)
        assert wait_until(lambda: closed_by_server(sock), SOCKET_TIMEOUT)


def test_bad_clients_cost_one_line_per_kind_and_the_same_worker_serves_on(echo_edge: Master, certs: Certs) -> None:
    (pid,) = echo_edge.wait_workers(1)
    for _ in range(BAD_CLIENTS):
        send_and_wait_closed(echo_edge, 0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plaintext on the TLS port
        send_and_wait_closed(echo_edge, 1, b"GET / HTTP/1.1\r\n\r\n" + proxy_v1("203.0.113.7"))  # garbage first
    assert tls_echo(certs, connect(echo_edge, 0), b"served on") == b"served on"
    with connect(echo_edge, 1) as sock:
        sock.sendall(proxy_v1("203.0.113.8"))
        assert echo(sock, b"proxied") == b"proxied"
    assert echo_edge.worker_pids() == {pid}
    tls_lines = lines_with(echo_edge, "TLS handshake failed", "HTTP_REQUEST")
    proxy_lines = lines_with(echo_edge, "PROXY header failed", "no header")
    # One line per kind per REPORT_INTERVAL: a second only if the loop above took that long.
    assert 1 <= len(tls_lines) <= 2 and 1 <= len(proxy_lines) <= 2, echo_edge.log()
    assert "Traceback" not in echo_edge.log()


@pytest.mark.parametrize("loop", LOOPS)
def test_the_failure_lines_are_limited_per_worker_not_per_listener(start_master: Any, loop: str) -> None:
    """As one parking lot per worker in sync mode: bad headers on two listeners of one worker are one line."""
    master: Master = start_master(app="workers.echo", mode="asyncio", loop=loop, workers=1,
                                  bind=["tcp://127.0.0.1:0?proxy", "tcp://127.0.0.1:0?proxy"])
    for _ in range(3):  # a few, well within REPORT_INTERVAL
        for index in (0, 1):
            send_and_wait_closed(master, index, b"GET / HTTP/1.1\r\n\r\n")
    with connect(master, 1) as sock:
        sock.sendall(proxy_v1("203.0.113.9"))
        assert echo(sock, b"still served") == b"still served"
    assert len(lines_with(master, "PROXY header failed", "no header")) == 1, master.log()


def test_the_next_line_of_a_kind_counts_the_connections_it_did_not_log(echo_edge: Master) -> None:
    for _ in range(BAD_CLIENTS):
        send_and_wait_closed(echo_edge, 0, b"plaintext\n")
    assert lines_with(echo_edge, "closed 1 connection(s): TLS handshake failed")

    def counted() -> list[int]:
        send_and_wait_closed(echo_edge, 0, b"plaintext\n")
        return [int(n) for n in re.findall(r"closed (\d+) connection\(s\): TLS handshake failed", echo_edge.log())
                if int(n) >= BAD_CLIENTS]
    assert wait_until(counted, REPORT_INTERVAL + SOCKET_TIMEOUT, interval=0.2)


# -- the loop's exception handler --------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_ssl_errors_the_loop_reports_are_one_line_and_other_loop_errors_keep_their_traceback(
        start_master: Any, certs: Certs, loop: str) -> None:
    master = start_master(app=AIO_APPS, mode="asyncio", loop=loop, workers=1, bind=["tcp://127.0.0.1:0?tls"],
                          certfile=str(certs.server[0]), keyfile=str(certs.server[1]))
    with certs.client_context().wrap_socket(connect(master, 0), server_hostname="127.0.0.1") as sock:
        for _ in range(5):
            assert echo(sock, b"ssl-error") == b"reported"
        assert echo(sock, b"loop-error") == b"scheduled"
        assert echo(sock, b"still served") == b"still served"
    wait_log(master, "RuntimeError: an unrelated loop error on purpose")
    assert len(lines_with(master, "TLS connection failed")) == 1, master.log()
    assert master.log().count("Traceback") == 1, master.log()


# -- a stop ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_handshake_does_not_hold_a_stop(start_master: Any, certs: Certs, loop: str) -> None:
    """With handshake_timeout and graceful_timeout far longer than the wait for the exit: the
    stopping worker gives a connection in its handshake one more second, as sync mode does."""
    master = start_master(app="workers.echo", mode="asyncio", loop=loop, workers=1, graceful_timeout=120,
                          handshake_timeout=120, bind=["tcp://127.0.0.1:0?tls"],
                          certfile=str(certs.server[0]), keyfile=str(certs.server[1]))
    with connect(master, 0) as stalled:
        stalled.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello, and nothing more
        assert tls_echo(certs, connect(master, 0), b"served") == b"served"
        master.signal(signal.SIGTERM)
        assert master.wait_exit(timeout=30) == EXIT_OK
        assert closed_by_server(stalled)
    assert "SIGKILL" not in master.log() and "Traceback" not in master.log(), master.log()


def test_access_lines_name_the_proxied_client_over_tls(start_master: Any, certs: Certs, tmp_path: Path) -> None:
    """PROXY v1, then TLS, on the default loop: the access line names the header's client and the TLS version."""
    master = start_master(app="workers.echo", mode="asyncio", workers=1, bind=["tcp://127.0.0.1:0?proxy&tls"],
                          certfile=str(certs.server[0]), keyfile=str(certs.server[1]),
                          access_log=str(tmp_path / "access.log"))
    sock = connect(master, 0)
    sock.sendall(proxy_v1("198.51.100.23", 40404))
    assert tls_echo(certs, sock, b"behind a balancer") == b"behind a balancer"
    lines = wait_access(tmp_path / "access.log", "198.51.100.23:40404 ", "tls=TLSv1.3/", " ok ")
    assert len(lines) == 1, lines
