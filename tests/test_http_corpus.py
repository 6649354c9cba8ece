"""tests/http_corpus.py against both HTTP services, and the proxy headers: one in-process server each."""

from __future__ import annotations

import io
import json
import socket
import ssl
import subprocess
from http.client import HTTPResponse
from typing import Any, Iterator

import pytest

from prefork.config import make_settings
from prefork.mixins import ThreadingMixIn
from tests.http_corpus import INVALID, LIMITS, VALID
from tests.support import SOCKET_TIMEOUT, recv_all, require_tool, serving, stream_request
from workers import http as http_service
from workers import wsgi

# After each valid request, on the same connection: its answer shows the request's end was found.
FOLLOW_UP = b"GET /health HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
REPORTED = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "CONTENT_TYPE", "REMOTE_ADDR",
            "wsgi.url_scheme", "HTTPS")


def report_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Reports the parse: the environ's strings and the body; /health answers ok."""
    if environ["PATH_INFO"] == "/health":
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    body = environ["wsgi.input"].read()
    seen = {key: value for key, value in environ.items()
            if key.startswith("HTTP_") or key in REPORTED}
    seen["body"] = body.decode("latin-1")
    data = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _threaded(server_class: Any) -> Any:
    return type("Threaded", (ThreadingMixIn, server_class), {"daemon_threads": True})


@pytest.fixture(scope="module")
def wsgi_server() -> Iterator[Any]:
    service = wsgi.configure(app=report_app, settings=make_settings(LIMITS))
    with _served(service) as server:
        yield server


@pytest.fixture(scope="module")
def static_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("site")
    service = http_service.configure(root=str(root), settings=make_settings(LIMITS))
    with _served(service) as server:
        yield server


def _served(service: Any) -> Any:
    listener = socket.create_server(("127.0.0.1", 0))
    return serving(_threaded(service.server_class).from_socket(listener, service.StreamHandler))


class _Unclosed(io.BytesIO):
    """HTTPResponse closes its file after the body: the next response is in the same bytes."""

    def close(self) -> None:
        pass


class _Replies:
    """Responses read one after another from the bytes a connection returned."""

    def __init__(self, data: bytes) -> None:
        self._file = _Unclosed(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file

    def next(self, method: str = "GET") -> tuple[HTTPResponse, bytes]:
        response = HTTPResponse(self, method=method)  # type: ignore[arg-type]
        response.begin()
        return response, response.read()

    def rest(self) -> bytes:
        return self._file.read()


def _keeps_alive(raw: bytes) -> bool:
    """Whether the request leaves its connection open (RFC 9112 9.3)."""
    head = raw.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0].lower()
    line = head.split(b"\r\n", 1)[0]
    if b"connection: close" in head:
        return False
    return line.endswith(b"http/1.1") or b"connection: keep-alive" in head


def _exchange(server: Any, raw: bytes) -> _Replies:
    follow = FOLLOW_UP if _keeps_alive(raw) else b""
    return _Replies(stream_request(server.server_address, raw + follow))


# One test per service and list, each case checked in a loop (a test item per case would cost
# more in fixtures than the case itself); a failure lists every case that went wrong.


def _check_all(cases: list[Any], check: Any) -> None:
    wrong = []
    for name, raw, expected in cases:
        try:
            check(raw, expected)
        except (AssertionError, OSError, ValueError) as exc:
            wrong.append(f"{name}: {exc!r}")
    assert not wrong, f"{len(wrong)} of {len(cases)} cases went wrong:\n" + "\n".join(wrong)


def test_wsgi_parses_each_valid_request(wsgi_server):
    def check(raw: bytes, expected: dict[str, Any]) -> None:
        replies = _exchange(wsgi_server, raw)
        method = expected["REQUEST_METHOD"]
        response, body = replies.next(method)
        assert response.status == 200, body
        if method != "HEAD":
            seen = json.loads(body)
            assert {key: seen.get(key) for key in expected} == expected
        if _keeps_alive(raw):
            assert replies.next()[1] == b"ok"  # the request's end was found: the next one is served
        assert replies.rest() == b""

    _check_all(VALID, check)


def test_static_serves_each_valid_request(static_server):
    def check(raw: bytes, expected: dict[str, Any]) -> None:
        replies = _exchange(static_server, raw)
        response, _ = replies.next(expected["REQUEST_METHOD"])
        assert response.status in (200, 301, 404, 501), response.status
        if _keeps_alive(raw) and not response.will_close:  # http.server closes after an error status
            assert replies.next()[1] == b"ok"

    _check_all(VALID, check)


@pytest.fixture(scope="module", params=["wsgi", "static"])
def either_server(request: pytest.FixtureRequest) -> Any:
    """Each service's server in turn. A fixture of module scope, like the servers: it is set up
    before the test's own fixtures, so the leak check (tests/conftest.py) counts the server's
    thread as there before the test, not as one the test left behind (the thread of a server
    taken by getfixturevalue() inside the test would be)."""
    return request.getfixturevalue(f"{request.param}_server")


def test_each_invalid_request_is_refused_and_the_connection_closed(either_server):
    server = either_server

    def check(raw: bytes, status: int) -> None:
        replies = _Replies(stream_request(server.server_address, raw))
        response, _ = replies.next()
        assert (response.status, response.getheader("Connection")) == (status, "close")
        assert replies.rest() == b""  # nothing after the refusal: whatever followed was not parsed

    _check_all(INVALID, check)


def test_the_corpus_is_large_enough():
    assert len(VALID) >= 100 and len(INVALID) >= 100
    assert len({case[0] for case in VALID + INVALID}) == len(VALID) + len(INVALID)


# -- behind a proxy ------------------------------------------------------------------------------

PROXIED = [
    ("X-Forwarded-For: 203.0.113.7", {"REMOTE_ADDR": "203.0.113.7", "wsgi.url_scheme": "http"}),
    ("X-Forwarded-For: 198.51.100.1, 203.0.113.7", {"REMOTE_ADDR": "203.0.113.7"}),
    ("X-Forwarded-Proto: https", {"wsgi.url_scheme": "https", "HTTPS": "on"}),
    ("X-Forwarded-Proto: gopher", {"wsgi.url_scheme": "http"}),
    ("X-Forwarded-Host: shop.example", {"HTTP_HOST": "shop.example"}),
    ('Forwarded: for="[2001:db8::1]:4711";proto=https;host=a.example',
     {"REMOTE_ADDR": "2001:db8::1", "wsgi.url_scheme": "https", "HTTP_HOST": "a.example"}),
    ("Forwarded: for=192.0.2.60;proto=http, for=198.51.100.17", {"REMOTE_ADDR": "198.51.100.17"}),
    ("Forwarded: for=unknown", {"REMOTE_ADDR": "127.0.0.1"}),
    ("Forwarded: for=192.0.2.1\r\nX-Forwarded-For: 203.0.113.9", {"REMOTE_ADDR": "192.0.2.1"}),
]


@pytest.mark.parametrize("header,expected", PROXIED)
def test_wsgi_believes_forwarded_headers_from_a_trusted_proxy(wsgi_server, header, expected):
    raw = f"GET /p HTTP/1.1\r\nHost: example.com\r\n{header}\r\nConnection: close\r\n\r\n".encode()
    seen = json.loads(_Replies(stream_request(wsgi_server.server_address, raw)).next()[1])
    assert {key: seen.get(key) for key in expected} == expected


def test_wsgi_ignores_forwarded_headers_from_anyone_else():
    service = wsgi.configure(app=report_app, settings=make_settings({"forwarded_allow_ips": ["10.0.0.0/8"]}))
    raw = (b"GET /p HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
           b"Forwarded: for=192.0.2.1\r\nConnection: close\r\n\r\n")
    with _served(service) as server:
        seen = json.loads(_Replies(stream_request(server.server_address, raw)).next()[1])
    assert (seen["REMOTE_ADDR"], seen["wsgi.url_scheme"], seen["HTTP_HOST"]) == ("127.0.0.1", "http", "example.com")
    assert seen["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"  # still there for the app to see


def test_wsgi_on_a_tls_connection_says_https(tmp_path):
    """An ssl.SSLSocket request (what a TLS listener hands over): https, HTTPS=on."""
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    client_context.check_hostname = False
    service = wsgi.configure(app=report_app)
    listener = server_context.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
    with serving(_threaded(service.server_class).from_socket(listener, service.StreamHandler)) as server:
        with socket.create_connection(server.server_address, timeout=SOCKET_TIMEOUT) as raw:
            with client_context.wrap_socket(raw) as sock:
                sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                seen = json.loads(_Replies(recv_all(sock)).next()[1])
    assert (seen["wsgi.url_scheme"], seen["HTTPS"]) == ("https", "on")


def test_forwarded_allow_ips_takes_networks_and_star_only_when_given():
    from prefork.errors import ConfigError

    assert make_settings({}).forwarded_allow_ips == ["127.0.0.1/32", "::1/128"]
    assert make_settings({"forwarded_allow_ips": "*"}).forwarded_allow_ips == ["*"]
    assert make_settings({"forwarded_allow_ips": ["::1", "10.0.0.0/8"]}).forwarded_allow_ips == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(ConfigError, match="forwarded_allow_ips"):
        make_settings({"forwarded_allow_ips": ["not-an-address"]})

