"""Listeners: bind specs parsed, real sockets bound on loopback, systemd and re-exec hand-overs."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import prefork.listeners as listeners_module
from prefork.errors import EXIT_BIND, BindSpecError, ConfigError, ListenerError
from prefork.listeners import (
    BindSpec,
    Listener,
    bind,
    bind_all,
    default_backlog,
    inherit_env,
    inherited_listeners,
    listener_for_socket,
    parse_bind,
    rebind_reuse_port,
    systemd_listeners,
)
from tests.support import SOCKET_TIMEOUT, require_tool, wait_until

REPO = Path(__file__).resolve().parent.parent

# How long a helper process may take to start, serve its request and exit.
CHILD_DEADLINE = 20.0

# Code every helper process starts with: the API, and one request served on a listener.
CHILD_PRELUDE = """
import os, socket, sys
from prefork.errors import ListenerError
from prefork.listeners import *

def serve_one(listener):
    listener.sock.setblocking(True)
    listener.sock.settimeout(10)
    if listener.is_stream:
        conn, _ = listener.sock.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(listener.name.encode() + b" " + conn.recv(1024).upper())
    else:
        data, peer = listener.sock.recvfrom(1024)
        listener.sock.sendto(listener.name.encode() + b" " + data.upper(), peer)
"""


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def opened() -> Iterator[list[Listener]]:
    """Listeners a test opens; closed (and their files removed) when it ends."""
    found: list[Listener] = []
    yield found
    for listener in found:
        listener.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for socket files (sun_path allows only 107 bytes)."""
    path = tempfile.mkdtemp(prefix="pf-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bound(opened: list[Listener], text: str, **kwargs: Any) -> Listener:
    listener = bind(parse_bind(text), **kwargs)
    opened.append(listener)
    return listener


def address_of(listener: Listener) -> Any:
    return listener.sock.getsockname()


def stream_round_trip(listener: Listener, payload: bytes = b"ping") -> bytes:
    """Connect to *listener*, have it answer upper-cased through an accepted socket."""
    with socket.socket(listener.sock.family, socket.SOCK_STREAM) as client:
        client.settimeout(SOCKET_TIMEOUT)
        client.connect(address_of(listener))
        client.sendall(payload)
        listener.sock.settimeout(SOCKET_TIMEOUT)
        conn, _ = listener.sock.accept()
        with conn:
            conn.settimeout(SOCKET_TIMEOUT)
            conn.sendall(conn.recv(1024).upper())
        return client.recv(1024)


def datagram_round_trip(listener: Listener, client_address: Any = None, payload: bytes = b"ping") -> bytes:
    with socket.socket(listener.sock.family, socket.SOCK_DGRAM) as client:
        client.settimeout(SOCKET_TIMEOUT)
        if client_address is not None:
            client.bind(client_address)
        client.sendto(payload, address_of(listener))
        listener.sock.settimeout(SOCKET_TIMEOUT)
        data, peer = listener.sock.recvfrom(1024)
        listener.sock.sendto(data.upper(), peer)
        return client.recv(1024)


def request(family: int, kind: int, address: Any, payload: bytes) -> bytes:
    """One request from a client to a server in another process; returns its whole reply."""
    with socket.socket(family, kind) as client:
        client.settimeout(SOCKET_TIMEOUT)
        if kind == socket.SOCK_STREAM:
            client.connect(address)
            client.sendall(payload)
            return client.recv(1024)
        if family == socket.AF_UNIX:
            client.bind(address + ".client")
        client.sendto(payload, address)
        return client.recv(1024)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


@contextlib.contextmanager
def child(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """A helper process; killed and reaped when the block ends if it has not finished."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=CHILD_DEADLINE)


def finish(proc: subprocess.Popen[str]) -> str:
    """Wait for a helper process to exit cleanly and return its output."""
    out, err = proc.communicate(timeout=CHILD_DEADLINE)
    assert proc.returncode == 0, f"helper failed ({proc.returncode}):\n{out}\n{err}"
    return out


# -- parse_bind --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, scheme, address, canonical", [
    ("tcp://127.0.0.1:9000", "tcp", ("127.0.0.1", 9000), "tcp://127.0.0.1:9000"),
    ("TCP://127.0.0.1:09000", "tcp", ("127.0.0.1", 9000), "tcp://127.0.0.1:9000"),
    ("127.0.0.1:0", "tcp", ("127.0.0.1", 0), "tcp://127.0.0.1:0"),
    ("localhost:8000", "tcp", ("localhost", 8000), "tcp://localhost:8000"),
    ("tcp://[::1]:0", "tcp", ("::1", 0), "tcp://[::1]:0"),
    ("tcp://[::]:65535", "tcp", ("::", 65535), "tcp://[::]:65535"),
    ("[0:0::1]:80", "tcp", ("::1", 80), "tcp://[::1]:80"),
    ("tcp://[fe80::1%eth0]:80", "tcp", ("fe80::1%eth0", 80), "tcp://[fe80::1%eth0]:80"),
    ("udp://0.0.0.0:53", "udp", ("0.0.0.0", 53), "udp://0.0.0.0:53"),
    ("udp://[::1]:5353", "udp", ("::1", 5353), "udp://[::1]:5353"),
    ("unix:/run/x.sock", "unix", "/run/x.sock", "unix:/run/x.sock"),
    ("unix:///run/x.sock", "unix", "/run/x.sock", "unix:/run/x.sock"),
    ("unix://relative.sock", "unix", "relative.sock", "unix:relative.sock"),
    ("unix:relative.sock", "unix", "relative.sock", "unix:relative.sock"),
    ("unix:////twice", "unix", "//twice", "unix:////twice"),
    ("unix-dgram:/run/log.sock", "unix-dgram", "/run/log.sock", "unix-dgram:/run/log.sock"),
    ("unix-dgram:///run/log.sock", "unix-dgram", "/run/log.sock", "unix-dgram:/run/log.sock"),
    ("fd://3", "fd", 3, "fd://3"),
    ("fd://007", "fd", 7, "fd://7"),
    ("systemd", "systemd", None, "systemd"),
    ("systemd:web", "systemd", "web", "systemd:web"),
])
def test_parse_bind_accepts_every_form(text: str, scheme: str, address: Any, canonical: str) -> None:
    spec = parse_bind(text)
    assert spec == BindSpec(scheme, address, canonical)
    assert parse_bind(spec.text) == spec
    assert str(spec) == canonical


@pytest.mark.parametrize("text, problem", [
    ("", "empty bind spec"),
    ("tcp://127.0.0.1", "missing ':PORT'"),
    ("127.0.0.1", "missing ':PORT'"),
    ("tcp://:80", "missing host"),
    (":80", "missing host"),
    ("tcp://::1:80", "IPv6 address goes in brackets"),
    ("tcp://[::1:80", "missing ']'"),
    ("tcp://[::1]", "missing ':PORT' after the IPv6 address"),
    ("tcp://[::1]80", "missing ':PORT' after the IPv6 address"),
    ("tcp://[nope]:80", "'nope' is not an IPv6 address"),
    ("tcp://[127.0.0.1]:80", "is not an IPv6 address"),
    ("tcp://127.0.0.1:65536", "port '65536' is not a number from 0 to 65535"),
    ("tcp://127.0.0.1:-1", "port '-1' is not a number"),
    ("tcp://127.0.0.1:http", "port 'http' is not a number"),
    ("tcp://127.0.0.1:٨٠", "port '٨٠' is not a number"),
    ("tcp://127.0.0.1:80/", "port '80/' is not a number"),
    ("tcp://127.0.0.1:" + "9" * 5000, "is not a number"),
    ("tcp://exa mple:80", "'exa mple' is not a host name or IP address"),
    ("tcp://user@host:80", "is not a host name"),
    ("tcp:127.0.0.1:80", "'tcp:' must be followed by '//'"),
    ("udp:53", "'udp:' must be followed by '//'"),
    ("fd:3", "'fd:' must be followed by '//'"),
    ("http://127.0.0.1:80", "unknown scheme 'http'"),
    ("unix:", "missing the socket's path"),
    ("unix://", "missing the socket's path"),
    ("unix", "missing the socket's path"),
    ("unix-dgram:", "missing the socket's path"),
    ("unix:/tmp/a\0b", "NUL"),
    ("unix:/" + "x" * 107, "108 bytes long"),
    ("unix:/tmp/\udc00\ud800", "cannot be encoded"),
    ("fd://", "'' is not a file descriptor number"),
    ("fd://-1", "is not a file descriptor number"),
    ("fd://3x", "is not a file descriptor number"),
    ("fd://2147483648", "is not a file descriptor number"),
    ("systemd:", "'' is not a socket name"),
    ("systemd:a:b", "is not a socket name"),
    ("systemd:caf\u00e9", "is not a socket name"),
    ("systemd:" + "n" * 256, "is not a socket name"),
])
def test_parse_bind_errors_name_the_spec_the_problem_and_the_forms(text: str, problem: str) -> None:
    with pytest.raises(BindSpecError) as caught:
        parse_bind(text)
    message = str(caught.value)
    assert problem in message
    assert repr(text) in message
    assert "accepted forms: tcp://HOST:PORT" in message and "systemd:NAME" in message
    assert caught.value.exit_code == 2


def test_bindspec_is_stream_where_the_spec_can_tell() -> None:
    assert parse_bind("tcp://127.0.0.1:0").is_stream
    assert parse_bind("unix:/x").is_stream
    assert not parse_bind("udp://127.0.0.1:0").is_stream
    assert not parse_bind("unix-dgram:/x").is_stream
    for text in ("fd://3", "systemd"):
        with pytest.raises(ValueError, match="Listener.is_stream"):
            parse_bind(text).is_stream


_SCHEME_WORDS = {"tcp", "udp", "fd", "unix", "unix-dgram", "systemd"}
_hostnames = st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True)
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
    _hostnames,
)
_ports = st.integers(0, 65535)


def _encodable(path: str) -> bool:
    try:
        return len(os.fsencode(path)) <= 107
    except UnicodeError:
        return False


_paths = st.text(min_size=1, max_size=80).filter(lambda p: "\0" not in p and _encodable(p) and p != "//")
_fdnames = st.from_regex(r"[\x20-\x39\x3b-\x7e]{1,40}", fullmatch=True)


@given(prefix=st.sampled_from(["tcp://", "udp://", "TCP://", ""]), host=_hosts, port=_ports)
def test_inet_specs_round_trip(prefix: str, host: str, port: int) -> None:
    if prefix == "" and host.lower() in _SCHEME_WORDS:
        return  # "unix:80" is a Unix path and "tcp:80" an error: a bare host cannot be a scheme's name
    spec = parse_bind(f"{prefix}{host}:{port}")
    assert spec.scheme == (prefix[:3].lower() or "tcp")
    assert spec.address[1] == port
    assert parse_bind(spec.text) == spec


@given(scheme=st.sampled_from(["unix", "unix-dgram"]), slashes=st.booleans(), path=_paths)
def test_unix_specs_round_trip(scheme: str, slashes: bool, path: str) -> None:
    spec = parse_bind(f"{scheme}:{'//' if slashes else ''}{path}")
    expected = path if slashes or not path.startswith("//") else path[2:]
    assert (spec.scheme, spec.address) == (scheme, expected)
    assert parse_bind(spec.text) == spec


@given(fd=st.integers(0, 2**31 - 1), name=_fdnames)
def test_fd_and_systemd_specs_round_trip(fd: int, name: str) -> None:
    for text, address in ((f"fd://{fd}", fd), (f"systemd:{name}", name)):
        spec = parse_bind(text)
        assert spec.address == address
        assert parse_bind(spec.text) == spec


@given(st.one_of(st.text(), st.text(alphabet="tcpudfsyemnix-:/[]%0123456789.a ", max_size=30)))
@settings(max_examples=500)
def test_garbage_raises_only_bindspecerror_and_what_parses_round_trips(text: str) -> None:
    try:
        spec = parse_bind(text)
    except BindSpecError:
        return
    assert parse_bind(spec.text) == spec


# -- tcp and udp -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, family", [
    ("tcp://127.0.0.1:0", socket.AF_INET),
    ("tcp://[::1]:0", socket.AF_INET6),
    ("127.0.0.1:0", socket.AF_INET),
])
def test_tcp_listener_serves_a_real_client(opened: list[Listener], text: str, family: int) -> None:
    listener = bound(opened, text)
    assert listener.is_stream and listener.sock.family == family
    assert stream_round_trip(listener) == b"PING"
    port = address_of(listener)[1]
    assert port != 0
    host = "[::1]" if family == socket.AF_INET6 else "127.0.0.1"
    assert listener.name == f"tcp://{host}:{port}"
    assert parse_bind(listener.name).address == (host.strip("[]"), port)


def test_tcp_listener_options(opened: list[Listener]) -> None:
    listener = bound(opened, "tcp://[::1]:0")
    assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert listener.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert not listener.sock.get_inheritable()
    assert is_listening(listener.sock)
    assert not listener.reuses_port


def test_host_names_are_resolved(opened: list[Listener]) -> None:
    listener = bound(opened, "tcp://localhost:0")
    assert listener.spec.text == "tcp://localhost:0"
    assert listener.name.rpartition(":")[0] in ("tcp://127.0.0.1", "tcp://[::1]")
    assert stream_round_trip(listener) == b"PING"


@pytest.mark.parametrize("text, family", [
    ("udp://127.0.0.1:0", socket.AF_INET), ("udp://[::1]:0", socket.AF_INET6),
])
def test_udp_listener_serves_a_real_client(opened: list[Listener], text: str, family: int) -> None:
    listener = bound(opened, text)
    assert not listener.is_stream and listener.sock.family == family
    assert datagram_round_trip(listener) == b"PING"
    assert listener.name.startswith("udp://") and not listener.name.endswith(":0")


def test_ipv6_any_and_ipv4_any_coexist_on_one_port(opened: list[Listener]) -> None:
    six = bound(opened, "tcp://[::]:0")
    port = address_of(six)[1]
    four = bound(opened, f"tcp://0.0.0.0:{port}")
    assert (six.name, four.name) == (f"tcp://[::]:{port}", f"tcp://0.0.0.0:{port}")


def test_busy_tcp_port_is_refused_naming_the_address(opened: list[Listener]) -> None:
    first = bound(opened, "tcp://127.0.0.1:0")
    busy = first.name
    with pytest.raises(ListenerError) as caught:
        bind(parse_bind(busy))
    assert caught.value.exit_code == EXIT_BIND == 4
    assert caught.value.address == busy
    assert str(caught.value) == f"cannot listen on {busy}: address already in use"


def test_busy_udp_port_is_refused(opened: list[Listener]) -> None:
    # Without SO_REUSEADDR on UDP sockets: with it, Linux would let the second bind succeed
    # and silently split the datagrams between two servers.
    first = bound(opened, "udp://127.0.0.1:0")
    with pytest.raises(ListenerError, match="address already in use"):
        bind(parse_bind(first.name))


def test_address_not_on_this_machine_is_refused() -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never a local address.
    with pytest.raises(ListenerError, match=r"tcp://192\.0\.2\.1:0: cannot assign requested address"):
        bind(parse_bind("tcp://192.0.2.1:0"))


def test_unresolvable_host_is_refused() -> None:
    # An empty label: the IDNA codec refuses it before any DNS query is made.
    with pytest.raises(ListenerError, match=r"cannot resolve host 'a\.\.b'"):
        bind(parse_bind("tcp://a..b:0"))


def test_privileged_port_names_the_reason() -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1:
        pytest.skip("every port is unprivileged on this machine")
    # The helper binds once as it is (loading every codec it needs while it still can read
    # the interpreter's files), then drops to nobody if it is root.
    code = CHILD_PRELUDE + """
bind(parse_bind("tcp://127.0.0.1:0")).close()
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    bind(parse_bind("tcp://127.0.0.1:1"))
except ListenerError as exc:
    print(exc.exit_code, exc)
"""
    with child([sys.executable, "-c", code]) as proc:
        out = finish(proc)
    assert out.strip() == ("4 cannot listen on tcp://127.0.0.1:1: "
                           "permission denied (ports below 1024 need privileges)")


def test_default_backlog_reads_somaxconn() -> None:
    assert default_backlog() == int(Path("/proc/sys/net/core/somaxconn").read_text())


def _ss_backlog(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=CHILD_DEADLINE, check=True).stdout
    return int(out.split()[2])  # State Recv-Q Send-Q: for a listening socket Send-Q is the backlog


def test_backlog_is_the_os_maximum_unless_given(opened: list[Listener]) -> None:
    require_tool("ss")  # iproute2 reads a listening socket's backlog
    default = bound(opened, "tcp://127.0.0.1:0")
    small = bound(opened, "tcp://127.0.0.1:0", backlog=7)
    assert _ss_backlog(address_of(default)[1]) == default_backlog()
    assert _ss_backlog(address_of(small)[1]) == 7


@pytest.mark.parametrize("setting, value", [
    ("backlog", -1), ("backlog", True), ("unix_mode", 0o10000), ("unix_mode", -1), ("unix_mode", "0660"),
    ("unix_owner", "no-such-user-here"), ("unix_group", "no-such-group-here"), ("unix_owner", -5),
])
def test_wrong_settings_are_config_errors_naming_the_setting(sockdir: str, setting: str, value: Any) -> None:
    path = os.path.join(sockdir, "s")
    with pytest.raises(ConfigError) as caught:
        bind(parse_bind(f"unix:{path}"), **{setting: value})
    assert f"setting '{setting}'" in str(caught.value) and repr(value) in str(caught.value)
    assert caught.value.exit_code == 2
    assert not os.path.exists(path)  # refused before anything was bound


def test_bind_all_binds_all_or_none(sockdir: str, opened: list[Listener]) -> None:
    busy = bound(opened, "tcp://127.0.0.1:0")
    path = os.path.join(sockdir, "first.sock")
    before = open_fds()
    with pytest.raises(ListenerError) as caught:
        bind_all([f"unix:{path}", "tcp://127.0.0.1:0", "udp://127.0.0.1:0", busy.name])
    assert caught.value.address == busy.name
    assert open_fds() == before
    assert not os.path.exists(path)


def test_bind_all_parses_every_spec_before_binding(sockdir: str) -> None:
    path = os.path.join(sockdir, "s")
    with pytest.raises(BindSpecError):
        bind_all([f"unix:{path}", "tcp://nope"])
    assert not os.path.exists(path)


def test_bind_all_returns_listeners_in_order(sockdir: str, opened: list[Listener]) -> None:
    path = os.path.join(sockdir, "s")
    found = bind_all(["tcp://127.0.0.1:0", parse_bind("udp://127.0.0.1:0"), f"unix:{path}"])
    opened.extend(found)
    assert [listener.spec.scheme for listener in found] == ["tcp", "udp", "unix"]
    assert found[2].name == f"unix:{path}"


# -- reuse_port ------------------------------------------------------------------------------------


def test_rebind_reuse_port_gives_sockets_that_share_the_tcp_port(opened: list[Listener]) -> None:
    master = bound(opened, "tcp://127.0.0.1:0", reuse_port=True)
    assert master.reuses_port and not is_listening(master.sock)  # parked: takes no connection
    workers = [rebind_reuse_port(master), rebind_reuse_port(master)]
    opened.extend(workers)
    assert [w.name for w in workers] == [master.name] * 2
    assert all(is_listening(w.sock) and not w.sock.get_inheritable() for w in workers)
    for worker in workers:
        worker.sock.setblocking(False)
    served: set[int] = set()

    def one_more_connection() -> bool:
        with socket.create_connection(address_of(master), timeout=SOCKET_TIMEOUT):
            pass
        for index, worker in enumerate(workers):
            with contextlib.suppress(BlockingIOError):
                worker.sock.accept()[0].close()
                served.add(index)
        return served == {0, 1}

    wait_until(one_more_connection, timeout=10, message="the kernel never balanced to both sockets")


def test_rebind_reuse_port_gives_sockets_that_share_the_udp_port(opened: list[Listener]) -> None:
    master = bound(opened, "udp://127.0.0.1:0", reuse_port=True)
    workers = [rebind_reuse_port(master), rebind_reuse_port(master)]
    opened.extend(workers)
    assert master.name == workers[0].name == workers[1].name
    for sock in (master.sock, *(w.sock for w in workers)):
        sock.setblocking(False)
    received = [0, 0]
    sent = 0

    def one_more_datagram() -> bool:
        nonlocal sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"x", address_of(workers[0]))
        sent += 1
        for index, worker in enumerate(workers):
            with contextlib.suppress(BlockingIOError):
                while worker.sock.recv(16):
                    received[index] += 1
        # 40 datagrams: were the master's socket in the balancing, it would get none of them
        # with a chance of (2/3)**40, about 1e-7.
        return sent >= 40 and all(received)

    wait_until(one_more_datagram, timeout=10, message=f"datagrams not balanced: {received}")
    with pytest.raises(BlockingIOError):
        master.sock.recv(16)  # parked: nothing came to the master's socket


def test_rebind_leaves_listeners_that_do_not_reuse_the_port(sockdir: str, opened: list[Listener]) -> None:
    plain = bound(opened, "tcp://127.0.0.1:0")
    unix = bound(opened, f"unix:{sockdir}/s", reuse_port=True)
    assert rebind_reuse_port(plain) is plain
    assert rebind_reuse_port(unix) is unix
    assert is_listening(unix.sock)  # Unix sockets are shared as usual, reuse_port or not


# -- unix ------------------------------------------------------------------------------------------


def test_unix_stream_listener_serves_a_real_client(sockdir: str, opened: list[Listener]) -> None:
    path = os.path.join(sockdir, "s.sock")
    listener = bound(opened, f"unix://{path}")
    assert listener.name == f"unix:{path}" and listener.is_stream
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stream_round_trip(listener) == b"PING"


def test_unix_datagram_listener_serves_a_real_client(sockdir: str, opened: list[Listener]) -> None:
    path = os.path.join(sockdir, "d.sock")
    listener = bound(opened, f"unix-dgram:{path}")
    assert listener.name == f"unix-dgram:{path}" and not listener.is_stream
    assert datagram_round_trip(listener, client_address=os.path.join(sockdir, "client")) == b"PING"


@pytest.mark.parametrize("scheme, kind", [("unix", socket.SOCK_STREAM), ("unix-dgram", socket.SOCK_DGRAM)])
def test_stale_socket_file_is_replaced(sockdir: str, opened: list[Listener], scheme: str, kind: int) -> None:
    path = os.path.join(sockdir, "stale")
    with socket.socket(socket.AF_UNIX, kind) as dead:
        dead.bind(path)  # closed without unlinking: what a crashed server leaves behind
    listener = bound(opened, f"{scheme}:{path}")  # binding over the old file would fail
    if kind == socket.SOCK_STREAM:
        assert stream_round_trip(listener) == b"PING"
    else:
        assert datagram_round_trip(listener, client_address=path + ".client") == b"PING"


@pytest.mark.parametrize("scheme, kind", [
    ("unix", socket.SOCK_STREAM), ("unix-dgram", socket.SOCK_DGRAM), ("unix", socket.SOCK_DGRAM),
])
def test_live_socket_file_is_refused(sockdir: str, scheme: str, kind: int) -> None:
    path = os.path.join(sockdir, "live")
    with socket.socket(socket.AF_UNIX, kind) as live:
        live.bind(path)
        if kind == socket.SOCK_STREAM:
            live.listen()
        with pytest.raises(ListenerError) as caught:
            bind(parse_bind(f"{scheme}:{path}"))
        assert str(caught.value) == f"cannot listen on {scheme}:{path}: {path} is in use by another process"
        assert caught.value.exit_code == 4
        assert os.path.exists(path)


def test_socket_with_a_full_backlog_counts_as_live(sockdir: str) -> None:
    path = os.path.join(sockdir, "busy")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live, contextlib.ExitStack() as clients:
        live.bind(path)
        live.listen(0)
        for _ in range(4):  # fill the accept queue; the next connect would wait
            client = clients.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(path)
        with pytest.raises(ListenerError, match="in use by another process"):
            bind(parse_bind(f"unix:{path}"))


@pytest.mark.parametrize("make", ["file", "dir", "symlink"])
def test_existing_non_socket_is_refused(sockdir: str, make: str) -> None:
    path = os.path.join(sockdir, "x")
    if make == "file":
        Path(path).write_text("data")
    elif make == "dir":
        os.mkdir(path)
    else:
        os.symlink("/nonexistent", path)
    with pytest.raises(ListenerError) as caught:
        bind(parse_bind(f"unix:{path}"))
    assert str(caught.value) == f"cannot listen on unix:{path}: {path} exists and is not a socket"
    assert os.path.lexists(path)


def test_missing_directory_is_named(sockdir: str) -> None:
    path = os.path.join(sockdir, "no", "s")
    with pytest.raises(ListenerError, match=f"the directory {sockdir}/no does not exist"):
        bind(parse_bind(f"unix:{path}"))


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o777])
def test_unix_mode_is_applied(sockdir: str, opened: list[Listener], mode: int) -> None:
    path = os.path.join(sockdir, "m")
    umask = os.umask(0o022)
    try:
        bound(opened, f"unix:{path}", unix_mode=mode)
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.lstat(path).st_mode) == mode


def test_socket_file_is_never_more_permissive_than_the_mode(sockdir: str, opened: list[Listener],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(sockdir, "m")
    seen: list[int] = []
    real_chmod = os.chmod

    def spying_chmod(target: Any, mode: int, **kwargs: Any) -> None:
        seen.append(stat.S_IMODE(os.lstat(target).st_mode))  # the file as bind() left it
        real_chmod(target, mode, **kwargs)

    monkeypatch.setattr(listeners_module.os, "chmod", spying_chmod)
    umask = os.umask(0)  # the most permissive process umask
    try:
        bound(opened, f"unix:{path}", unix_mode=0o600)
    finally:
        os.umask(umask)
    assert seen and seen[0] & ~0o600 == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_unix_owner_and_group_are_applied(sockdir: str, opened: list[Listener]) -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid)
    for owner, group_value in (("nobody", group.gr_name), (nobody.pw_uid, str(group.gr_gid))):
        path = os.path.join(sockdir, f"o{owner}")
        bound(opened, f"unix:{path}", unix_owner=owner, unix_group=group_value, unix_mode=0o660)
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o660)


def test_close_removes_our_socket_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "s")
    listener = bind(parse_bind(f"unix:{path}"))
    listener.close()
    assert not os.path.lexists(path) and listener.fileno() == -1
    listener.close()  # twice is harmless


def test_close_without_unlink_keeps_the_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "s")
    bind(parse_bind(f"unix:{path}")).close(unlink=False)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_close_leaves_a_replaced_file_alone(sockdir: str) -> None:
    path = os.path.join(sockdir, "s")
    listener = bind(parse_bind(f"unix:{path}"))
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)  # another server took the path
        listener.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_forked_child_never_removes_the_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "s")
    listener = bind(parse_bind(f"unix:{path}"))
    try:
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        listener.close()
    assert not os.path.lexists(path)


# -- fd:// and listener_for_socket -------------------------------------------------------------------


def test_fd_spec_adopts_an_open_socket(opened: list[Listener]) -> None:
    with socket.socket() as original:
        original.bind(("127.0.0.1", 0))  # bound, not listening: adoption makes it listen
        fd = os.dup(original.fileno())
        os.set_inheritable(fd, True)
    listener = bound(opened, f"fd://{fd}")
    assert listener.fileno() == fd and listener.is_stream
    assert not os.get_inheritable(fd)
    assert listener.spec.text == f"fd://{fd}"
    assert listener.name.startswith("tcp://127.0.0.1:")
    assert stream_round_trip(listener) == b"PING"


def test_fd_spec_adopts_a_datagram_socket(opened: list[Listener]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as original:
        original.bind(("127.0.0.1", 0))
        fd = os.dup(original.fileno())
    listener = bound(opened, f"fd://{fd}")
    assert not listener.is_stream and listener.name.startswith("udp://127.0.0.1:")
    assert datagram_round_trip(listener) == b"PING"


def test_fd_spec_refuses_what_is_not_a_socket(tmp_path: Path) -> None:
    with open(tmp_path / "file", "w") as file:
        fd = file.fileno()
        with pytest.raises(ListenerError) as caught:
            bind(parse_bind(f"fd://{fd}"))
        os.fstat(fd)  # still open: refusing it did not close the caller's file
    assert str(caught.value) == f"cannot listen on fd://{fd}: file descriptor {fd}: not a socket"


def test_fd_spec_refuses_a_closed_descriptor() -> None:
    fd = os.dup(0)
    os.close(fd)
    with pytest.raises(ListenerError, match=f"file descriptor {fd}: no such open file descriptor"):
        bind(parse_bind(f"fd://{fd}"))


def test_one_descriptor_cannot_serve_two_specs() -> None:
    with socket.socket() as original:
        original.bind(("127.0.0.1", 0))
        fd = os.dup(original.fileno())
    with pytest.raises(ListenerError, match=f"file descriptor {fd} is already used by another bind spec"):
        bind_all([f"fd://{fd}", f"fd://{fd}"])
    with pytest.raises(OSError) as caught:
        os.fstat(fd)  # all or none: the fd adopted for the first spec was closed again
    assert caught.value.errno == errno.EBADF


def test_listener_for_socket_names_what_a_server_bound(sockdir: str) -> None:
    path = os.path.join(sockdir, "srv")
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        listener = listener_for_socket(tcp)
        assert listener.spec == parse_bind(listener.name) and listener.name.startswith("tcp://127.0.0.1:")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    listener = listener_for_socket(unix)
    assert listener.name == f"unix:{path}"
    listener.close()
    assert not os.path.lexists(path)  # the server's socket file goes when its listener does
    with socket.socket(socket.AF_UNIX) as unnamed:
        assert listener_for_socket(unnamed).spec.scheme == "fd"


# -- systemd socket activation ---------------------------------------------------------------------


def test_systemd_socket_activation_with_the_real_tool(sockdir: str) -> None:
    require_tool("systemd-socket-activate")
    path = os.path.join(sockdir, "sd.sock")
    code = CHILD_PRELUDE + """
found = bind_all(["systemd:web"])
assert len(found) == 1 and not os.get_inheritable(found[0].fileno()), found
serve_one(found[0])
"""
    tool = ["systemd-socket-activate", "--listen", path, "--fdname=web", sys.executable, "-c", code]
    with child(tool) as proc:
        # The tool binds the path, then starts the service on the first connection.
        reply = wait_until(lambda: _try_unix_request(path, b"hello"), timeout=CHILD_DEADLINE)
        finish(proc)
    assert reply == f"unix:{path} HELLO".encode()


def _try_unix_request(path: str, payload: bytes) -> bytes | None:
    try:
        return request(socket.AF_UNIX, socket.SOCK_STREAM, path, payload)
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # the tool has not bound the path yet


# A child that plays systemd's part for itself: the sockets passed (their fds in argv) move to
# fds 3, 4, ... and the LISTEN_* variables name this very process, which only it can know.
SYSTEMD_WRAPPER = CHILD_PRELUDE + """
import fcntl
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1:]]  # out of the way of 3, 4...
for fd in sys.argv[1:]:
    os.close(int(fd))
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(high)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=os.environ["NAMES"])
"""

PASSED_SOCKETS = SYSTEMD_WRAPPER + """
try:
    bind(parse_bind(os.environ["REFUSED"]))
except ListenerError as exc:
    print("refused:", exc)
passed = []
for name, sock in systemd_listeners(os.environ):
    passed.append((name, sock.fileno(), os.get_inheritable(sock.fileno()), sock.type == socket.SOCK_STREAM))
    sock.detach()  # only looked at: bind_all() below adopts the fd
print("passed:", passed, flush=True)
found = bind_all([os.environ["SPEC"]])
print("names:", " ".join(listener.name for listener in found), flush=True)
for listener in found:
    serve_one(listener)
"""


def test_systemd_activation_of_a_tcp_socket(opened: list[Listener]) -> None:
    listener = bound(opened, "tcp://127.0.0.1:0")
    env = {**os.environ, "NAMES": "api", "SPEC": "systemd:api", "REFUSED": "systemd:web"}
    args = [sys.executable, "-c", PASSED_SOCKETS, str(listener.fileno())]
    with child(args, pass_fds=(listener.fileno(),), env=env) as proc:
        reply = request(socket.AF_INET, socket.SOCK_STREAM, address_of(listener), b"hello")
        out = finish(proc)
    assert reply == f"{listener.name} HELLO".encode()
    assert ("refused: cannot listen on systemd:web: "
            "systemd passed no socket named 'web' (names passed: 'api')") in out
    assert "passed: [('api', 3, False, True)]" in out


def test_systemd_spec_takes_every_passed_socket(opened: list[Listener]) -> None:
    tcp = bound(opened, "tcp://127.0.0.1:0")
    udp = bound(opened, f"udp://127.0.0.1:{address_of(tcp)[1]}")  # TCP and UDP on one port
    env = {**os.environ, "NAMES": "web:web", "SPEC": "systemd", "REFUSED": "systemd:web"}
    args = [sys.executable, "-c", PASSED_SOCKETS, str(tcp.fileno()), str(udp.fileno())]
    with child(args, pass_fds=(tcp.fileno(), udp.fileno()), env=env) as proc:
        replies = [request(socket.AF_INET, socket.SOCK_STREAM, address_of(tcp), b"one"),
                   request(socket.AF_INET, socket.SOCK_DGRAM, address_of(udp), b"two")]
        out = finish(proc)
    assert replies == [f"{tcp.name} ONE".encode(), f"{udp.name} TWO".encode()]
    assert "refused: cannot listen on systemd:web: systemd passed 2 sockets; bind_all() takes them all" in out
    assert "passed: [('web', 3, False, True), ('web', 4, False, False)]" in out
    assert f"names: {tcp.name} {udp.name}" in out


def test_systemd_sockets_of_another_process_are_ignored() -> None:
    other = str(os.getpid() + 1)
    assert systemd_listeners({"LISTEN_PID": other, "LISTEN_FDS": "1"}) == []
    assert systemd_listeners({"LISTEN_FDS": "1"}) == []
    assert systemd_listeners({"LISTEN_PID": str(os.getpid())}) == []
    with pytest.raises(ListenerError, match=f"LISTEN_FDS was set for process {other}, not for this one"):
        bind(parse_bind("systemd"), environ={"LISTEN_PID": other, "LISTEN_FDS": "1"})


def test_systemd_spec_without_activation_explains_why() -> None:
    with pytest.raises(ListenerError) as caught:
        bind(parse_bind("systemd"), environ={})
    assert caught.value.exit_code == 4
    assert str(caught.value).startswith("cannot listen on systemd: LISTEN_FDS was not set for this process")
    ours = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    with pytest.raises(ListenerError, match=r"systemd passed no sockets \(LISTEN_FDS=0\)"):
        bind(parse_bind("systemd:web"), environ=ours)
    with pytest.raises(ListenerError, match="LISTEN_FDS='x' is not a number"):
        systemd_listeners({**ours, "LISTEN_FDS": "x"})


# -- in-place upgrade: PREFORK_FDS through a real exec -------------------------------------------------


INHERITING_MASTER = CHILD_PRELUDE + """
inherited = inherited_listeners(os.environ)
found = bind_all(sys.argv[1:], inherited=inherited)
extra = int(os.environ["EXTRA_FD"])
try:
    os.fstat(extra)
    print("extra: open")
except OSError:
    print("extra: closed")
print("names:", " ".join(listener.name for listener in found))
print("inheritable:", any(os.get_inheritable(listener.fileno()) for listener in found), flush=True)
for listener in found:
    serve_one(listener)
"""


def test_inherited_sockets_are_adopted_after_exec(sockdir: str, opened: list[Listener]) -> None:
    path = os.path.join(sockdir, "up.sock")
    specs = ["tcp://127.0.0.1:0", f"unix:{path}", "udp://127.0.0.1:0", "tcp://127.0.0.1:0"]
    tcp, unix, udp, extra = bind_all(specs)
    opened.extend([tcp, unix, udp, extra])
    env = {**os.environ, **inherit_env([tcp, unix, udp, extra]), "EXTRA_FD": str(extra.fileno())}
    assert all(os.get_inheritable(listener.fileno()) for listener in opened)
    # The new master asks for tcp by the spec the user gave (port 0) and udp by its bound name.
    specs = ["tcp://127.0.0.1:0", f"unix:{path}", udp.name]
    # close_fds=False: as os.execv, only inheritable descriptors survive the exec.
    with child([sys.executable, "-c", INHERITING_MASTER, *specs], env=env, close_fds=False) as proc:
        replies = [
            request(socket.AF_INET, socket.SOCK_STREAM, address_of(tcp), b"one"),
            request(socket.AF_UNIX, socket.SOCK_STREAM, path, b"two"),
            request(socket.AF_INET, socket.SOCK_DGRAM, address_of(udp), b"three"),
        ]
        out = finish(proc)
    assert replies == [f"{tcp.name} ONE".encode(), f"unix:{path} TWO".encode(), f"{udp.name} THREE".encode()]
    assert f"names: {tcp.name} unix:{path} {udp.name}" in out
    assert "inheritable: False" in out
    assert "extra: closed" in out  # handed over but no longer configured: closed, not left queueing
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # the old master's file is still in place


def test_inherit_env_lists_each_socket_under_both_names(sockdir: str, opened: list[Listener]) -> None:
    path = os.path.join(sockdir, "we;ird%25")
    tcp, unix = bind_all(["tcp://127.0.0.1:0", f"unix:{path}"])
    opened.extend([tcp, unix])
    env = inherit_env([tcp, unix])
    assert set(env) == {"PREFORK_FDS"}
    entries = env["PREFORK_FDS"].split(";")
    assert entries[:2] == [f"{tcp.fileno()}:tcp://127.0.0.1:0", f"{tcp.fileno()}:{tcp.name}"]
    assert len(entries) == 3  # the Unix socket's spec and name are the same text
    # Wrap duplicates of our own fds, as a re-executed master would wrap the originals.
    dups = {listener.fileno(): os.dup(listener.fileno()) for listener in (tcp, unix)}
    moved = [f"{dups[int(fd)]}:{text}" for fd, _, text in (entry.partition(":") for entry in entries)]
    found = inherited_listeners({"PREFORK_FDS": ";".join(moved)})
    try:
        assert set(found) == {"tcp://127.0.0.1:0", tcp.name, f"unix:{path}"}
        assert found["tcp://127.0.0.1:0"] is found[tcp.name]
        assert found[f"unix:{path}"].getsockname() == path
        assert not any(sock.get_inheritable() for sock in found.values())
    finally:
        for sock in {id(s): s for s in found.values()}.values():
            sock.close()


def test_every_inherited_socket_of_a_systemd_spec_is_adopted(opened: list[Listener]) -> None:
    # The old master had adopted two systemd sockets for the spec "systemd"; after the re-exec
    # LISTEN_PID names the old process, so the new one finds them only in PREFORK_FDS.
    originals = [bound(opened, "tcp://127.0.0.1:0"), bound(opened, "udp://127.0.0.1:0")]
    copies = [Listener(parse_bind("systemd"), socket.socket(fileno=os.dup(l.fileno()))) for l in originals]
    env = inherit_env(copies)
    for copy in copies:
        copy.sock.detach()  # inherited_listeners() below wraps these fds: one object per fd
    inherited = inherited_listeners(env)
    with pytest.raises(ListenerError, match="2 inherited sockets match; bind_all"):
        bind(parse_bind("systemd"), inherited=inherited, environ={})
    found = bind_all(["systemd"], inherited=inherited, environ={})
    opened.extend(found)
    assert [listener.name for listener in found] == [listener.name for listener in originals]
    assert [listener.spec.text for listener in found] == ["systemd", "systemd"]


@pytest.mark.parametrize("value, problem", [
    ("x", "entry 'x' is not FD:SPEC"),
    ("3", "entry '3' is not FD:SPEC"),
    ("3:", "entry '3:' is not FD:SPEC"),
])
def test_malformed_prefork_fds_is_a_listener_error(value: str, problem: str) -> None:
    with pytest.raises(ListenerError, match=problem):
        inherited_listeners({"PREFORK_FDS": value})


def test_inherited_fd_that_is_not_open_is_named() -> None:
    fd = os.dup(0)
    os.close(fd)
    with pytest.raises(ListenerError, match=f"inherited file descriptor {fd} \\(PREFORK_FDS\\)"):
        inherited_listeners({"PREFORK_FDS": f"{fd}:tcp://127.0.0.1:0"})
    assert inherited_listeners({}) == {}


# -- allow-lists (?allow=) ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, canonical, networks", [
    ("tcp://0.0.0.0:8000?allow=10.0.0.0/8,127.0.0.1/32", "tcp://0.0.0.0:8000?allow=10.0.0.0/8,127.0.0.1/32",
     ["10.0.0.0/8", "127.0.0.1/32"]),
    ("TCP://0.0.0.0:8000?allow=127.0.0.1,10.0.0.0/8,10.0.0.0/8", "tcp://0.0.0.0:8000?allow=10.0.0.0/8,127.0.0.1/32",
     ["10.0.0.0/8", "127.0.0.1/32"]),  # sorted, each once, bare address = /32
    ("0.0.0.0:80?allow=10.0.0.0/255.0.0.0", "tcp://0.0.0.0:80?allow=10.0.0.0/8", ["10.0.0.0/8"]),
    ("udp://[::]:53?allow=2001:DB8:0::/32,::1,192.0.2.0/24", "udp://[::]:53?allow=192.0.2.0/24,::1/128,2001:db8::/32",
     ["192.0.2.0/24", "::1/128", "2001:db8::/32"]),  # IPv4 first
    ("fd://03?allow=0.0.0.0/0", "fd://3?allow=0.0.0.0/0", ["0.0.0.0/0"]),
    ("systemd?allow=10.1.0.0/16", "systemd?allow=10.1.0.0/16", ["10.1.0.0/16"]),
    ("systemd:we?rd?allow=10.1.0.0/16", "systemd:we?rd?allow=10.1.0.0/16", ["10.1.0.0/16"]),
])
def test_allow_lists_parse_to_sorted_networks_and_a_canonical_text(text: str, canonical: str,
                                                                   networks: list[str]) -> None:
    spec = parse_bind(text)
    assert spec.text == canonical
    assert [str(n) for n in spec.allow] == networks
    assert parse_bind(spec.text) == spec
    assert spec.address_text == canonical.partition("?allow=")[0]
    assert spec.address == parse_bind(spec.address_text).address


def test_a_spec_without_allow_admits_every_client_and_equals_the_old_form() -> None:
    assert parse_bind("tcp://127.0.0.1:80").allow == ()
    assert parse_bind("tcp://127.0.0.1:80") == BindSpec("tcp", ("127.0.0.1", 80), "tcp://127.0.0.1:80")
    assert parse_bind("unix:/run/a?b=c").address == "/run/a?b=c"  # '?' is just a character of a path


@pytest.mark.parametrize("text, problem", [
    ("unix:/run/x.sock?allow=127.0.0.1", "allow= does not apply to Unix sockets"),
    ("unix-dgram:/run/x.sock?allow=127.0.0.1", "allow= does not apply to Unix sockets"),
    ("tcp://0.0.0.0:80?allow=", "allow= lists no network"),
    ("tcp://0.0.0.0:80?allow=10.0.0.0/8,", "allow= has an empty network"),
    ("tcp://0.0.0.0:80?allow=10.0.0.1/8", "'10.0.0.1/8' is not valid: it has host bits set; did you mean 10.0.0.0/8?"),
    ("tcp://0.0.0.0:80?allow=10.0.0.0/33", "allow= network '10.0.0.0/33' is not valid"),
    ("tcp://0.0.0.0:80?allow=300.0.0.0/8", "allow= network '300.0.0.0/8' is not valid"),
    ("tcp://0.0.0.0:80?allow=localhost", "allow= network 'localhost' is not a network in CIDR form"),
    ("tcp://0.0.0.0:80?allow=fe80::%eth0/64", "allow= network 'fe80::%eth0/64' is not a network"),
    ("tcp://0.0.0.0:80?allow=١٠.0.0.0/8", "is not a network in CIDR form"),
    ("tcp://0.0.0.0:80?allow=10.0.0.0/8?allow=::1", "'10.0.0.0/8?allow=::1' is not a network"),
    ("tcp://0.0.0.0:80?deny=10.0.0.0/8", "unknown option 'deny' after '?'"),
    ("tcp://0.0.0.0:80?", "unknown option '' after '?'"),
    ("fd://3?ALLOW=10.0.0.0/8", "unknown option 'ALLOW' after '?'"),
])
def test_allow_list_errors_name_the_spec_and_the_bad_network(text: str, problem: str) -> None:
    with pytest.raises(BindSpecError) as caught:
        parse_bind(text)
    assert problem in str(caught.value)
    assert repr(text) in str(caught.value)
    assert caught.value.exit_code == 2


def test_check_config_refuses_a_unix_allow_list_with_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "prefork", "check-config", "--bind", "unix:/tmp/x.sock?allow=::1"],
                            cwd=REPO, capture_output=True, text=True, timeout=CHILD_DEADLINE)
    assert result.returncode == 2
    assert "allow= does not apply to Unix sockets" in result.stderr and "Traceback" not in result.stderr


def test_a_listener_name_is_its_bound_address_without_the_allow_list(opened: list[Listener]) -> None:
    listener = bound(opened, "tcp://127.0.0.1:0?allow=10.0.0.0/8")
    assert listener.name == f"tcp://127.0.0.1:{address_of(listener)[1]}"
    assert [str(n) for n in listener.spec.allow] == ["10.0.0.0/8"]


def test_an_upgrade_may_change_the_allow_list_of_an_inherited_socket(opened: list[Listener]) -> None:
    old = bound(opened, "tcp://127.0.0.1:0?allow=10.0.0.0/8")
    entries = inherit_env([old])["PREFORK_FDS"].split(";")
    assert entries == [f"{old.fileno()}:tcp://127.0.0.1:0", f"{old.fileno()}:{old.name}"]  # no allow= in them
    dup = os.dup(old.fileno())  # as the re-executed master would find the original
    inherited = inherited_listeners({"PREFORK_FDS": ";".join(f"{dup}:{e.partition(':')[2]}" for e in entries)})
    new = bind_all(["tcp://127.0.0.1:0?allow=192.0.2.0/24"], inherited=inherited, environ={})
    opened.extend(new)
    assert new[0].fileno() == dup and new[0].name == old.name
    assert [str(n) for n in new[0].spec.allow] == ["192.0.2.0/24"]


def test_an_allow_list_on_an_adopted_unix_socket_is_refused(opened: list[Listener]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.detach()  # handed to bind(), which owns (and on failure closes) it
    with ours:
        with pytest.raises(ListenerError, match=f"allow= needs a TCP or UDP socket, and file descriptor {fd} "):
            bind(parse_bind(f"fd://{fd}?allow=127.0.0.0/8"), environ={})
    with contextlib.suppress(OSError):
        os.close(fd)
