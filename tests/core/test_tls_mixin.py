"""TLSMixIn: stdlib-style servers over TLS (README "TLS for socketserver code")."""

from __future__ import annotations

import logging
import socket
import ssl

import pytest

from prefork.handlers import StreamRequestHandler
from prefork.mixins import TLSMixIn, ThreadingMixIn
from prefork.servers import TCPServer
from tests.support import SOCKET_TIMEOUT, Certs, serving


class Echo(StreamRequestHandler):
    def handle(self) -> None:
        self.server.requests.append(self.request)  # type: ignore[attr-defined]
        self.wfile.write(self.rfile.readline())


class Server(TLSMixIn, ThreadingMixIn, TCPServer):
    handshake_timeout = 2.0

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Echo)
        self.ssl_context = context
        self.requests: list[object] = []


def server_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certs.server))
    return context


def test_a_threading_server_serves_tls_and_the_handler_gets_the_ssl_socket(certs: Certs) -> None:
    with serving(Server(server_context(certs))) as server:
        raw = socket.create_connection(server.server_address, timeout=SOCKET_TIMEOUT)
        with certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"over tls\n")
            assert sock.makefile("rb").readline() == b"over tls\n"
        assert isinstance(server.requests[0], ssl.SSLSocket)


def test_a_plaintext_client_costs_one_log_line_and_no_traceback(certs: Certs, caplog: pytest.LogCaptureFixture,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, "prefork.server")
    with serving(Server(server_context(certs))) as server:
        with socket.create_connection(server.server_address, timeout=SOCKET_TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert sock.recv(100) == b""  # closed without an answer
            except ConnectionResetError:
                pass  # closed with the request unread: the kernel resets
    assert any("TLS handshake with" in r.getMessage() for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err and server.requests == []
