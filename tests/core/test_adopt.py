"""Adopting a socket that is already bound (what a worker gets from the master or systemd)."""

from __future__ import annotations

import os
import socket

import pytest

import prefork.socketserver as socketserver
from tests.core.test_stdlib_modules import ThreadingHTTPServer, WSGIServer
from tests.support import datagram_request, serving, stream_request


class Upper(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline().upper())


class UpperDatagram(socketserver.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.read().upper())


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def bind_calls(monkeypatch):
    """Every bind() and listen() made on a Python socket object while the test runs."""
    calls: list[tuple[str, object]] = []
    real_bind, real_listen = socket.socket.bind, socket.socket.listen

    def bind(self, address):
        calls.append(("bind", address))
        return real_bind(self, address)

    def listen(self, *backlog):
        calls.append(("listen", backlog))
        return real_listen(self, *backlog)

    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(socket.socket, "listen", listen)
    return calls


IPV6 = pytest.param(
    ("::1", socket.AF_INET6),
    marks=pytest.mark.skipif(
        not ipv6_loopback_available(), reason="no IPv6 loopback (::1) on this host"
    ),
    id="ipv6",
)


@pytest.mark.parametrize("host_family", [pytest.param(("127.0.0.1", socket.AF_INET), id="ipv4"), IPV6])
def test_tcp_from_socket(host_family, bind_calls):
    host, family = host_family
    listener = socket.create_server((host, 0), family=family)
    name = listener.getsockname()
    del bind_calls[:]  # create_server's own bind and listen are the only ones allowed
    fds_before = open_fds()
    server = socketserver.TCPServer.from_socket(listener, Upper)
    assert server.socket is listener
    assert server.server_address == name
    assert server.address_family == family
    assert bind_calls == []  # nothing bound or listened to twice
    assert open_fds() == fds_before  # the socket made by the constructor was closed
    with serving(server):
        assert stream_request(name, b"adopted\n", family=family) == b"ADOPTED\n"
    assert listener.fileno() == -1


def test_adopt_socket_on_a_bound_socket_listens_once(bind_calls):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = socketserver.TCPServer(("127.0.0.1", 0), Upper, bind_and_activate=False)
    server.adopt_socket(sock)  # bound but not yet listening: adopt makes it listen, once
    assert [call for call, _ in bind_calls] == ["bind", "listen"]
    with serving(server):
        assert stream_request(sock.getsockname(), b"x\n") == b"X\n"


def test_adopt_socket_from_an_overridden_server_bind(bind_calls):
    # What PreforkMixIn does with a socket a replaced master handed over: swap it in while the
    # constructor runs, which then calls server_bind and server_activate once, as usual.
    inherited = socket.create_server(("127.0.0.1", 0))
    calls = []

    class Adopting(socketserver.TCPServer):
        def server_bind(self):
            if not calls:
                self.adopt_socket(inherited, bind_and_activate=False)
            calls.append("server_bind")
            super().server_bind()

        def server_activate(self):
            calls.append("server_activate")
            super().server_activate()

    del bind_calls[:]
    server = Adopting(("127.0.0.1", 0), Upper)
    assert server.socket is inherited
    assert calls == ["server_bind", "server_activate"]
    assert bind_calls == []
    assert server.server_address == inherited.getsockname()
    with serving(server):
        assert stream_request(server.server_address, b"y\n") == b"Y\n"


def test_udp_from_socket(bind_calls):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    del bind_calls[:]
    server = socketserver.UDPServer.from_socket(sock, UpperDatagram)
    assert server.server_address == sock.getsockname()
    assert bind_calls == []
    with serving(server):
        assert datagram_request(server.server_address, b"dgram") == b"DGRAM"


def test_unix_stream_from_socket(sock_dir, bind_calls):
    path = str(sock_dir / "adopt.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    del bind_calls[:]
    server = socketserver.UnixStreamServer.from_socket(sock, Upper)
    assert server.server_address == path
    assert bind_calls == []
    with serving(server):
        assert stream_request(path, b"unix\n", family=socket.AF_UNIX) == b"UNIX\n"


def test_unix_datagram_from_socket(sock_dir, bind_calls):
    path = str(sock_dir / "adopt.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    del bind_calls[:]
    server = socketserver.UnixDatagramServer.from_socket(sock, UpperDatagram)
    assert server.server_address == path
    assert bind_calls == []
    with serving(server):
        reply = datagram_request(path, b"unix", family=socket.AF_UNIX, bind=str(sock_dir / "c.sock"))
    assert reply == b"UNIX"


def test_http_server_bookkeeping_runs_on_adopted_socket(bind_calls):
    listener = socket.create_server(("127.0.0.1", 0))
    del bind_calls[:]
    server = ThreadingHTTPServer.from_socket(listener, Upper)
    try:
        assert server.server_port == listener.getsockname()[1]
        assert server.server_name == socket.getfqdn("127.0.0.1")
        assert bind_calls == []
    finally:
        server.server_close()


def test_wsgiref_base_environ_built_on_adopted_socket(bind_calls):
    listener = socket.create_server(("127.0.0.1", 0))
    del bind_calls[:]
    server = WSGIServer.from_socket(listener, Upper)
    try:
        assert server.base_environ["SERVER_PORT"] == str(listener.getsockname()[1])
        assert server.base_environ["SERVER_NAME"] == server.server_name
        assert bind_calls == []
    finally:
        server.server_close()


def test_from_socket_closes_the_half_built_server_on_failure():
    class Failing(socketserver.TCPServer):
        def server_activate(self):
            raise RuntimeError("activation refused")

    listener = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(RuntimeError, match="activation refused"):
        Failing.from_socket(listener, Upper)
    assert listener.fileno() == -1  # the half-built server was closed, and with it the socket
