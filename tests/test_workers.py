"""The bundled services in workers/, in-process: servers in threads on real loopback sockets."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from prefork.errors import AppLoadError
from prefork.mixins import ThreadingMixIn
from prefork.servers import TCPServer, UDPServer
from tests.support import SOCKET_TIMEOUT, datagram_request, recv_all, serving, stream_request
from workers import echo
from workers import http as http_service
from workers import wsgi

@contextlib.contextmanager
def tcp_service(server_class: Any, handler: Any) -> Iterator[Any]:
    """A server adopting a listener on 127.0.0.1, port 0, as a worker adopts the master's."""
    server = server_class.from_socket(socket.create_server(("127.0.0.1", 0)), handler)
    with serving(server):
        yield server


@contextlib.contextmanager
def unix_service(server_class: Any, handler: Any, path: Path) -> Iterator[Any]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    server = server_class.from_socket(listener, handler)
    with serving(server):
        yield server


def connect(address: Any, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(SOCKET_TIMEOUT)
    sock.connect(address)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(65536, size - len(data)))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def echo_exchange(sock: socket.socket, payload: bytes, size: int | None = None) -> bytes:
    """Send *payload* from a thread while reading *size* bytes back (default: as many as sent).

    Sending and reading at once, the echo of a long payload cannot fill both directions and
    deadlock client and server.
    """
    sender = threading.Thread(target=sock.sendall, args=(payload,), name="echo-sender")
    sender.start()
    try:
        return recv_exactly(sock, len(payload) if size is None else size)
    finally:
        sender.join(SOCKET_TIMEOUT)


# -- workers.echo -------------------------------------------------------------------------------


@pytest.fixture
def echo_tcp() -> Iterator[Any]:
    with tcp_service(TCPServer, echo.StreamHandler) as server:
        yield server


def test_echo_answers_each_line_before_the_client_closes(echo_tcp):
    with connect(echo_tcp.server_address) as sock:
        sock.sendall(b"one\ntwo\n")
        assert recv_exactly(sock, 8) == b"one\ntwo\n"
        sock.sendall(b"three\n")
        assert recv_exactly(sock, 6) == b"three\n"
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""


def test_echo_returns_a_last_line_without_newline_and_binary_data(echo_tcp):
    binary = bytes(range(256)) * 8  # every byte value, newlines and NULs included
    assert stream_request(echo_tcp.server_address, b"a\n" + binary + b"tail") == b"a\n" + binary + b"tail"


def test_echo_answers_an_oversized_line_in_pieces_before_its_newline(echo_tcp):
    with connect(echo_tcp.server_address) as sock:
        # No newline yet: a handler that waited for one would never answer this.
        assert echo_exchange(sock, b"x" * (echo.MAX_LINE + 10), echo.MAX_LINE) == b"x" * echo.MAX_LINE
        sock.sendall(b"\n")
        assert recv_exactly(sock, 11) == b"x" * 10 + b"\n"


def test_echo_returns_a_multi_megabyte_line_unchanged(echo_tcp):
    payload = bytes(range(251)) * 8000 + b"\n"  # ~2 MB, no period aligned with MAX_LINE
    with connect(echo_tcp.server_address) as sock:
        assert echo_exchange(sock, payload) == payload


def test_echo_closes_an_idle_connection(monkeypatch, caplog):
    monkeypatch.setattr(echo.StreamHandler, "timeout", 0.2)
    caplog.set_level(logging.INFO, "prefork.workers.echo")
    with tcp_service(TCPServer, echo.StreamHandler) as server, connect(server.server_address) as sock:
        assert recv_all(sock) == b""  # closed by the server, not by a timeout of ours
    assert any("idle" in r.getMessage() for r in caplog.records)


def test_echo_on_a_unix_stream(sock_dir):
    with unix_service(TCPServer, echo.StreamHandler, sock_dir / "echo.sock") as server:
        assert stream_request(server.server_address, b"hi\nthere\n", socket.AF_UNIX) == b"hi\nthere\n"


@pytest.fixture
def echo_udp() -> Iterator[Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    with serving(echo.datagram_server_class.from_socket(sock, echo.DatagramHandler)) as server:
        yield server


@pytest.mark.parametrize("payload", [b"ping", b"", bytes(range(256)), b"line\n" * 2, b"z" * 60000],
                         ids=["text", "empty", "binary", "newlines", "60000-bytes"])
def test_echo_returns_each_datagram_unchanged(echo_udp, payload):
    assert datagram_request(echo_udp.server_address, payload) == payload


def test_echo_datagram_server_reads_whole_datagrams():
    # socketserver's UDPServer reads 8 KiB: a 60000-byte datagram would come back truncated.
    assert UDPServer.max_packet_size < 60000 <= echo.datagram_server_class.max_packet_size


def test_echo_unix_datagrams_and_unbound_senders(sock_dir, capsys):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "echo.dgram"))
    with serving(echo.datagram_server_class.from_socket(sock, echo.DatagramHandler)) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
            unbound.sendto(b"no return address", server.server_address)
        reply = datagram_request(server.server_address, b"hello", socket.AF_UNIX, bind=str(sock_dir / "c.dgram"))
    assert reply == b"hello"
    assert "Traceback" not in capsys.readouterr().err


# -- workers.http -------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "docs").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, file\n")
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>")
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    return root


@pytest.fixture
def http_server(site: Path) -> Iterator[Any]:
    service = http_service.configure(root=str(site))
    with tcp_service(service.server_class, service.StreamHandler) as server:
        yield server


@contextlib.contextmanager
def http_connection(server: Any) -> Iterator[http.client.HTTPConnection]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=SOCKET_TIMEOUT)
    try:
        yield conn
    finally:
        conn.close()


def fetch(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


def test_http_serves_a_file_and_keeps_the_connection_alive(http_server):
    with http_connection(http_server) as conn:
        first, body = fetch(conn, "GET", "/hello.txt")
        sock = conn.sock
        assert (first.status, body, first.getheader("Content-Length")) == (200, b"hello, file\n", "12")
        assert first.version == 11 and not first.will_close
        second, body = fetch(conn, "GET", "/docs/")
        assert (second.status, body) == (200, b"<h1>docs</h1>")
        assert conn.sock is sock, "the second request needed a new connection"


def test_http_health_check_and_head(http_server):
    with http_connection(http_server) as conn:
        response, body = fetch(conn, "GET", "/health?probe=1")
        assert (response.status, body, response.getheader("Content-Type")) == (200, b"ok", "text/plain; charset=utf-8")
        response, body = fetch(conn, "HEAD", "/health")
        assert (response.status, body, response.getheader("Content-Length")) == (200, b"", "2")
        response, body = fetch(conn, "HEAD", "/hello.txt")
        assert (response.status, body, response.getheader("Content-Length")) == (200, b"", "12")


def head_then_get(address: Any, path: bytes) -> list[bytes]:
    """Pipeline HEAD and GET of *path* on one connection; the raw replies split at blank lines.

    Raw, because http.client drops whatever it buffered with a response, which would hide a
    body wrongly sent after a HEAD response.
    """
    with connect(address) as sock:
        sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\nGET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     % (path, path))
        return recv_all(sock).split(b"\r\n\r\n")


@pytest.mark.parametrize("path,body", [(b"/health", b"ok"), (b"/hello.txt", b"hello, file\n")])
def test_http_head_sends_no_body(http_server, path, body):
    head, get, get_body = head_then_get(http_server.server_address, path)
    assert head.startswith(b"HTTP/1.1 200 ") and get.startswith(b"HTTP/1.1 200 ") and get_body == body


@pytest.mark.parametrize("path", ["/missing.txt", "/../secret.txt", "/%2e%2e/secret.txt"])
def test_http_404_and_nothing_outside_the_root(http_server, path):
    with http_connection(http_server) as conn:
        response, body = fetch(conn, "GET", path)
    assert response.status == 404 and b"outside the root" not in body


def test_http_logs_requests_through_logging_not_stderr(http_server, caplog, capsys):
    caplog.set_level(logging.DEBUG, "prefork.access.http")
    with http_connection(http_server) as conn:
        fetch(conn, "GET", "/hello.txt")
        fetch(conn, "GET", "/missing.txt")
    lines = [r.getMessage() for r in caplog.records if r.name == "prefork.access.http"]
    assert any('"GET /hello.txt HTTP/1.1" 200' in line for line in lines), lines
    assert any('"GET /missing.txt HTTP/1.1" 404' in line for line in lines), lines
    assert capsys.readouterr().err == ""


def test_http_server_name_and_port_are_set_on_an_adopted_socket(http_server):
    assert http_server.server_port == http_server.server_address[1] != 0
    assert isinstance(http_server.server_name, str) and http_server.server_name


def test_http_module_level_handler_serves_the_current_directory(site, monkeypatch):
    monkeypatch.chdir(site)
    with tcp_service(http_service.server_class, http_service.StreamHandler) as server:
        with http_connection(server) as conn:
            assert fetch(conn, "GET", "/hello.txt")[1] == b"hello, file\n"


def test_http_on_a_unix_stream(site, sock_dir, caplog):
    caplog.set_level(logging.DEBUG, "prefork.access.http")
    service = http_service.configure(root=str(site))
    with unix_service(service.server_class, service.StreamHandler, sock_dir / "http.sock") as server:
        assert (server.server_name, server.server_port) == ("localhost", 0)
        reply = stream_request(server.server_address, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                               socket.AF_UNIX)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok")
    assert any(r.getMessage().startswith('unix "GET /health') for r in caplog.records)


def test_http_closes_an_idle_kept_alive_connection(site, monkeypatch):
    monkeypatch.setattr(http_service.StaticHandler, "timeout", 0.2)
    service = http_service.configure(root=str(site))
    with tcp_service(service.server_class, service.StreamHandler) as server:
        with connect(server.server_address) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = recv_all(sock)  # returns only when the server closes the idle connection
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"ok")


def test_http_configure_refuses_a_root_that_is_not_a_directory(tmp_path):
    with pytest.raises(AppLoadError, match="is not a directory"):
        http_service.configure(root=str(tmp_path / "nowhere"))


# -- workers.wsgi -------------------------------------------------------------------------------


APP_SOURCE = '''
import json

def app(environ, start_response):
    """Reports what it was given; the path picks a behaviour."""
    path = environ["PATH_INFO"]
    if path == "/fail":
        raise RuntimeError("the app failed on purpose")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"chunk one, ", b"chunk two"])
    if path == "/fail-late":
        start_response("200 OK", [("Content-Length", "100")])
        return fail_after_first_chunk()
    if path == "/short":
        start_response("200 OK", [("Content-Length", "100")])
        return [b"short"]
    if path == "/ignore-body":
        start_response("204 No Content", [("Content-Length", "0")])
        return []
    body = environ["wsgi.input"].read()
    report = {key: environ[key] for key in ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR",
                                            "SERVER_PORT", "wsgi.multithread", "wsgi.multiprocess")}
    report["body"] = body.decode()
    data = json.dumps(report).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]

def fail_after_first_chunk():
    yield b"partial"
    raise RuntimeError("failed after the headers")

not_callable = 42
'''


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch) -> Iterator[str]:
    """The name of a WSGI app module written in tmp_path and importable for this test."""
    name = f"wsgi_app_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@contextlib.contextmanager
def wsgi_service(app: Any, mixin: type | None = None) -> Iterator[Any]:
    service = wsgi.configure(app=app)
    server_class = service.server_class if mixin is None else type("S", (mixin, service.server_class), {})
    with tcp_service(server_class, service.StreamHandler) as server:
        yield server


@pytest.fixture
def app_server(app_module: str, monkeypatch) -> Iterator[Any]:
    # Idle connections outlive the clients' socket timeout: a test that expects the server to
    # close a connection fails if only the idle timeout would have closed it.
    monkeypatch.setattr(wsgi.WSGIRequestHandler, "timeout", SOCKET_TIMEOUT * 3)
    with wsgi_service(f"{app_module}:app") as server:
        yield server


def report(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
    import json

    response, data = fetch(conn, method, path, body)
    assert response.status == 200, data
    return dict(json.loads(data))


def test_wsgi_hello_app_with_keep_alive():
    with tcp_service(wsgi.server_class, wsgi.StreamHandler) as server, http_connection(server) as conn:
        first, body = fetch(conn, "GET", "/")
        sock = conn.sock
        second, again = fetch(conn, "GET", "/any/path")
        assert conn.sock is sock
    assert (first.status, body, first.getheader("Content-Length")) == (200, b"Hello, World!\n", "14")
    assert first.version == 11 and not first.will_close
    assert (second.status, again) == (200, b"Hello, World!\n")


def test_wsgi_custom_app_sees_the_request(app_server):
    with http_connection(app_server) as conn:
        seen = report(conn, "POST", "/items/%41?x=1", body=b"payload")
        sock = conn.sock
        again = report(conn, "GET", "/next")
        assert conn.sock is sock
    assert seen["REQUEST_METHOD"] == "POST" and seen["PATH_INFO"] == "/items/A" and seen["QUERY_STRING"] == "x=1"
    assert seen["body"] == "payload"  # read() with no size stopped at Content-Length
    assert seen["REMOTE_ADDR"] == "127.0.0.1" and seen["SERVER_PORT"] == str(app_server.server_port)
    assert seen["wsgi.multiprocess"] is True and seen["wsgi.multithread"] is False
    assert again["body"] == ""


def test_wsgi_multithread_in_a_threading_server(app_module):
    with wsgi_service(f"{app_module}:app", ThreadingMixIn) as server, http_connection(server) as conn:
        assert report(conn, "GET", "/")["wsgi.multithread"] is True


def test_wsgi_skips_a_body_the_app_did_not_read(app_server):
    with http_connection(app_server) as conn:
        response, _ = fetch(conn, "POST", "/ignore-body", body=b"x" * 5000)
        sock = conn.sock
        assert response.status == 204
        after = report(conn, "GET", "/after")
        assert (after["REQUEST_METHOD"], after["PATH_INFO"]) == ("GET", "/after")
        assert conn.sock is sock


def test_wsgi_closes_instead_of_skipping_a_huge_unread_body(app_server):
    size = wsgi.MAX_DISCARD + 1
    with connect(app_server.server_address) as sock:
        sock.sendall(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        reply = recv_all(sock)  # the server answers and closes without waiting for the body
    assert reply.startswith(b"HTTP/1.1 204 ") and b"Connection: close" in reply


def test_wsgi_app_error_gives_500_and_the_connection_goes_on(app_server, caplog, capsys):
    caplog.set_level(logging.ERROR, "prefork.workers.wsgi")
    with http_connection(app_server) as conn:
        response, body = fetch(conn, "GET", "/fail")
        sock = conn.sock
        assert response.status == 500 and body
        assert report(conn, "GET", "/ok")["PATH_INFO"] == "/ok"
        assert conn.sock is sock
    failures = [r for r in caplog.records if r.name == "prefork.workers.wsgi" and r.levelno == logging.ERROR]
    assert len(failures) == 1 and "GET /fail" in failures[0].getMessage()
    assert failures[0].exc_info is not None and "failed on purpose" in str(failures[0].exc_info[1])
    assert "Traceback" not in capsys.readouterr().err


def test_wsgi_app_failing_after_its_headers_closes_the_connection(app_server, caplog):
    caplog.set_level(logging.ERROR, "prefork.workers.wsgi")
    with connect(app_server.server_address) as sock:
        sock.sendall(b"GET /fail-late HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"partial")
    assert any("failed after the headers" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_wsgi_response_without_content_length_is_chunked_and_pipelining_goes_on(app_server):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = recv_all(sock)
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in first and b"Content-Length" not in first and b"Date: " in first
    assert rest.startswith(b"b\r\nchunk one, \r\n9\r\nchunk two\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert b'"PATH_INFO": "/next"' in rest


def test_wsgi_response_without_content_length_closes_an_http_1_0_connection(app_server):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply = recv_all(sock)  # returns only because the server closes after the response
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"Content-Length" not in head and body == b"chunk one, chunk two"


def test_wsgi_body_shorter_than_its_content_length_closes_the_connection(app_server, caplog):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = recv_all(sock)  # a kept-alive connection would leave the client waiting here
    assert reply.endswith(b"\r\n\r\nshort")
    assert any("Content-Length 100" in r.getMessage() for r in caplog.records)


def test_wsgi_head_never_sends_a_body():
    with tcp_service(wsgi.server_class, wsgi.StreamHandler) as server:
        head, get, body = head_then_get(server.server_address, b"/")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 14" in head  # the GET's length
    assert get.startswith(b"HTTP/1.1 200 ") and body == b"Hello, World!\n"


def test_wsgi_expect_100_continue_and_http_1_0_keep_alive(app_server):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert recv_exactly(sock, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body was sent
        sock.sendall(b"data")
        sock.sendall(b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        sock.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        replies = recv_all(sock).split(b"HTTP/1.1 200 OK\r\n")
    assert len(replies) == 4 and b'"body": "data"' in replies[1]
    assert b"Connection: keep-alive" in replies[2] and b"/ten" in replies[2]
    assert b"Connection: close" in replies[3] and b"/last" in replies[3]


@pytest.mark.parametrize("head,status", [
    (b"Transfer-Encoding: gzip, chunked\r\n", b"501"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"400"),
    (b"Content-Length: -1\r\n", b"400"),
    (b"Content-Length: 1\r\nContent-Length: 2\r\n", b"400"),
])
def test_wsgi_refuses_request_bodies_it_cannot_delimit(app_server, head, status):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 " + status + b" ") and b"Connection: close" in reply


SHARED_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "2")]


def shared_headers_app(environ: Any, start_response: Any) -> list[bytes]:
    """Passes the same module-level headers list on every call, as many apps do."""
    start_response("200 OK", SHARED_HEADERS)
    return [b"ok"]


def test_wsgi_never_changes_the_headers_list_the_app_passes():
    before = list(SHARED_HEADERS)
    with wsgi_service(shared_headers_app) as server:
        for _ in range(3):
            reply = stream_request(server.server_address,
                                   b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok"), reply
    assert SHARED_HEADERS == before


def test_wsgi_reads_a_chunked_body_with_trailers_then_serves_the_next_request(app_server):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
                     b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        replies = recv_all(sock).split(b"HTTP/1.1 200 OK\r\n")
    assert len(replies) == 3 and b'"body": "hello world"' in replies[1] and b"/last" in replies[2]


def test_wsgi_file_wrapper_sends_a_file_with_its_length_and_head_sends_none(tmp_path, monkeypatch):
    data = bytes(range(256)) * 1000
    (tmp_path / "blob").write_bytes(data)
    sent: list[int] = []
    real_sendfile = socket.socket.sendfile

    def counting_sendfile(self: socket.socket, file: Any, offset: int = 0, count: int | None = None) -> int:
        sent.append(count or 0)
        return real_sendfile(self, file, offset, count)

    def file_app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        blob = open(tmp_path / "blob", "rb")  # noqa: SIM115 - closed by the server through the wrapper
        blob.seek(1000)
        return environ["wsgi.file_wrapper"](blob)

    monkeypatch.setattr(socket.socket, "sendfile", counting_sendfile)
    with wsgi_service(file_app) as server:
        got = stream_request(server.server_address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                                                    b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, _, rest = got.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % (len(data) - 1000) in first and rest[:len(data) - 1000] == data[1000:]
    head = rest[len(data) - 1000:]
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # HEAD: no body
    assert sent == [len(data) - 1000]  # one sendfile, for the GET


def test_wsgi_closes_after_an_http_1_0_request_with_transfer_encoding(app_server):
    with connect(app_server.server_address) as sock:
        sock.sendall(b"POST /up HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\n\r\nGET /never HTTP/1.0\r\n\r\n")
        reply = recv_all(sock)  # returns because the server closes after the first response
    assert reply.count(b"HTTP/1.1 200 OK") == 1 and b'"body": "ok"' in reply and b"Connection: close" in reply


def test_wsgi_on_a_unix_stream(app_module, sock_dir):
    service = wsgi.configure(app=f"{app_module}:app")
    with unix_service(service.server_class, service.StreamHandler, sock_dir / "wsgi.sock") as server:
        reply = stream_request(server.server_address, b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                               socket.AF_UNIX)
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"REMOTE_ADDR": ""' in reply


def test_wsgi_base_environ_built_on_an_adopted_socket():
    with tcp_service(wsgi.server_class, wsgi.StreamHandler) as server:
        assert server.base_environ["SERVER_PORT"] == str(server.server_address[1])
        assert server.get_app() is wsgi.hello


def test_wsgi_configure_takes_a_callable_and_refuses_what_is_not_one(app_module):
    assert wsgi.configure(app=wsgi.hello).server_class.application is wsgi.hello
    with pytest.raises(AppLoadError, match="not a WSGI callable"):
        wsgi.configure(app=f"{app_module}:not_callable")
    with pytest.raises(AppLoadError, match="no module named"):
        wsgi.configure(app="no_such_module_here:app")


def test_every_service_declares_a_literal_default_bind():
    import ast

    for module in (echo, http_service, wsgi):
        tree = ast.parse(Path(module.__file__).read_text())
        values = [ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_BIND" for t in node.targets)]
        assert values == [module.DEFAULT_BIND] and all(isinstance(spec, str) for spec in values[0])
        assert module.__doc__.splitlines()[0].endswith("Runs in: worker.")

