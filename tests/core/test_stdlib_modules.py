"""The stdlib's own modules built on socketserver, given servers built on prefork.socketserver.

http.server, wsgiref.simple_server, xmlrpc.server and a logging.config.listen()-style config
server run unchanged on top of our classes; real clients (http.client, xmlrpc.client, a raw
socket speaking logging.config's wire format) check the result.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import logging
import logging.config
import socket
import struct
import xmlrpc.client
import xmlrpc.server
from wsgiref.simple_server import WSGIRequestHandler

import pytest

import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST
from tests.support import SOCKET_TIMEOUT, recv_all, serving


class HTTPServerBookkeeping:
    """What http.server.HTTPServer adds to TCPServer: its name and port, set in server_bind."""

    allow_reuse_address = True

    def server_bind(self):
        super().server_bind()
        host, port = self.server_address[:2]
        self.server_name = socket.getfqdn(host)
        self.server_port = port


class ThreadingHTTPServer(HTTPServerBookkeeping, socketserver.ThreadingTCPServer):
    """http.server.ThreadingHTTPServer, rebuilt on prefork.socketserver."""

    daemon_threads = True


class WSGIServer(HTTPServerBookkeeping, socketserver.TCPServer):
    """wsgiref.simple_server.WSGIServer, rebuilt on prefork.socketserver."""

    application = None

    def server_bind(self):
        super().server_bind()
        self.setup_environ()

    def setup_environ(self):
        env = self.base_environ = {}
        env["SERVER_NAME"] = self.server_name
        env["GATEWAY_INTERFACE"] = "CGI/1.1"
        env["SERVER_PORT"] = str(self.server_port)
        env["REMOTE_HOST"] = ""
        env["CONTENT_LENGTH"] = ""
        env["SCRIPT_NAME"] = ""

    def get_app(self):
        return self.application

    def set_app(self, application):
        self.application = application


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass  # the access log would go to stderr; the test reads the response instead


class QuietWSGIHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def http_get(address, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address[:2], timeout=SOCKET_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_simple_http_request_handler_serves_a_file(tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hello from prefork\n")
    handler = functools.partial(QuietFileHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(LOCALHOST, handler)
    assert server.server_port == server.server_address[1]
    with serving(server):
        status, headers, body = http_get(server.server_address, "/hello.txt")
        missing, _, _ = http_get(server.server_address, "/nope.txt")
    assert (status, body) == (200, b"hello from prefork\n")
    assert headers["Content-Length"] == str(len(body))
    assert missing == 404


def wsgi_app(environ, start_response):
    body = "%s %s on %s:%s" % (
        environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["SERVER_NAME"], environ["SERVER_PORT"]
    )
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Served-By", "prefork")])
    return [body.encode()]


def test_wsgiref_app():
    server = WSGIServer(LOCALHOST, QuietWSGIHandler)
    server.set_app(wsgi_app)
    port = server.server_address[1]
    assert server.base_environ["SERVER_PORT"] == str(port)
    with serving(server):
        status, headers, body = http_get(server.server_address, "/some/path")
    assert status == 200
    assert headers["X-Served-By"] == "prefork"
    assert body == ("GET /some/path on %s:%d" % (server.server_name, port)).encode()


class XMLRPCServer(xmlrpc.server.SimpleXMLRPCDispatcher, socketserver.TCPServer):
    """xmlrpc.server.SimpleXMLRPCServer, rebuilt on prefork.socketserver."""

    allow_reuse_address = True
    _send_traceback_header = False

    def __init__(self, addr, requestHandler=xmlrpc.server.SimpleXMLRPCRequestHandler,
                 logRequests=True, allow_none=False, encoding=None,
                 bind_and_activate=True, use_builtin_types=False):
        self.logRequests = logRequests
        xmlrpc.server.SimpleXMLRPCDispatcher.__init__(self, allow_none, encoding, use_builtin_types)
        socketserver.TCPServer.__init__(self, addr, requestHandler, bind_and_activate)


class TimeoutTransport(xmlrpc.client.Transport):
    """xmlrpc.client has no timeout argument; every socket in these tests needs one."""

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = SOCKET_TIMEOUT
        return conn


def test_xmlrpc_server():
    server = XMLRPCServer(LOCALHOST, logRequests=False)
    server.register_function(pow)
    server.register_function(lambda a, b: a + b, "add")
    host, port = server.server_address
    with serving(server):
        url = "http://%s:%d/" % (host, port)
        with xmlrpc.client.ServerProxy(url, transport=TimeoutTransport()) as proxy:
            assert proxy.pow(2, 10) == 1024
            assert proxy.add("pre", "fork") == "prefork"
            with pytest.raises(xmlrpc.client.Fault):
                proxy.missing()


class ConfigStreamHandler(socketserver.StreamRequestHandler):
    """logging.config.listen()'s protocol: a 4-byte big-endian length, then the config.

    As in the stdlib, a JSON payload is applied with dictConfig.
    """

    def handle(self):
        (length,) = struct.unpack(">L", self.rfile.read(4))
        payload = self.rfile.read(length)
        logging.config.dictConfig(json.loads(payload.decode("utf-8")))
        self.wfile.write(b"applied")


def send_logging_config(address, config: dict) -> bytes:
    """What a client of logging.config.listen() sends (see the logging cookbook)."""
    data = json.dumps(config).encode("utf-8")
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(struct.pack(">L", len(data)))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


@pytest.fixture
def target_logger():
    logger = logging.getLogger("tests.core.listen_target")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    yield logger
    logger.setLevel(previous)


def test_logging_config_listen_protocol(target_logger):
    config = {"version": 1, "incremental": True, "loggers": {target_logger.name: {"level": "DEBUG"}}}
    with serving(socketserver.ThreadingTCPServer(LOCALHOST, ConfigStreamHandler)) as server:
        assert send_logging_config(server.server_address, config) == b"applied"
    assert target_logger.level == logging.DEBUG
