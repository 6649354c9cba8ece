"""The bundled services in workers/, served by real masters in subprocesses."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.conftest import ROOT
from tests.support import SOCKET_TIMEOUT, datagram_request, stream_request, wait_until
from tests.test_workers import connect, echo_exchange, head_then_get

pytestmark = pytest.mark.integration


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for Unix sockets: pytest's tmp_path can exceed AF_UNIX's 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def http_get(conn: http.client.HTTPConnection, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn.request(method, path)
    response = conn.getresponse()
    return response.status, response.read()


def open_connection(address: Any) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(address[0], address[1], timeout=SOCKET_TIMEOUT)


def test_echo_on_tcp_udp_and_unix_listeners(start_master, short_dir):
    path = short_dir / "echo.sock"
    master = start_master(app="workers.echo", workers=2,
                          bind=["tcp://127.0.0.1:0", "udp://127.0.0.1:0", f"unix:{path}"])
    assert master.request(b"hello") == b"hello"
    assert datagram_request(master.address(1), b"ping") == b"ping"
    assert datagram_request(master.address(1), b"") == b""
    assert datagram_request(master.address(1), bytes(range(256)) * 4) == bytes(range(256)) * 4
    assert stream_request(str(path), b"one\ntwo", socket.AF_UNIX) == b"one\ntwo"
    long_line = bytes(range(1, 251)) * 1000 + b"\n"  # 250 kB: several MAX_LINE pieces
    with connect(master.address(0)) as sock:
        assert echo_exchange(sock, long_line) == long_line


def test_http_serves_the_current_directory_in_thread_mode(start_master):
    master = start_master(app="workers.http", workers=2, mode="thread", threads=4, loglevel="debug")
    conn = open_connection(master.address())
    try:
        assert http_get(conn, "/health") == (200, b"ok")
        sock = conn.sock
        assert http_get(conn, "/README.md") == (200, (ROOT / "README.md").read_bytes())  # the master's cwd
        assert conn.sock is sock, "keep-alive: the second request needed a new connection"
        assert http_get(conn, "/no/such/file")[0] == 404
    finally:
        conn.close()
    head, get, body = head_then_get(master.address(), b"/health")
    assert head.startswith(b"HTTP/1.1 200 ") and get.startswith(b"HTTP/1.1 200 ") and body == b"ok"
    wait_until(lambda: '"GET /health HTTP/1.1" 200' in master.log(), 10.0,
               message=f"no access log line:\n{master.log()}")


def test_http_serves_a_configured_root(start_master, tmp_path):
    # Until the test runner passes service options, a module calls configure() as serve() would
    # (importing only the package: a module with a configure attribute would be called again).
    root = tmp_path / "www"
    root.mkdir()
    (root / "page.html").write_bytes(b"<p>configured</p>")
    (tmp_path / "http_root_service.py").write_text(
        f"import workers.http\nservice = workers.http.configure(root={str(root)!r})\n"
        "StreamHandler, server_class = service.StreamHandler, service.server_class\n")
    master = start_master(app="http_root_service", workers=1, pythonpath=tmp_path)
    conn = open_connection(master.address())
    try:
        assert http_get(conn, "/page.html") == (200, b"<p>configured</p>")
        assert http_get(conn, "/README.md")[0] == 404  # the master's cwd is not served
    finally:
        conn.close()


def test_wsgi_hello_app_with_keep_alive(start_master):
    master = start_master(app="workers.wsgi", workers=2)
    conn = open_connection(master.address())
    try:
        assert http_get(conn, "/") == (200, b"Hello, World!\n")
        sock = conn.sock
        assert http_get(conn, "/again") == (200, b"Hello, World!\n")
        assert conn.sock is sock
    finally:
        conn.close()


CUSTOM_APP = '''
import json, os
from workers.wsgi import StreamHandler, wsgi_server_class

def app(environ, start_response):
    if environ["PATH_INFO"] == "/fail":
        raise RuntimeError("the app failed on purpose")
    body = json.dumps({"pid": os.getpid(), "multiprocess": environ["wsgi.multiprocess"],
                       "path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

server_class = wsgi_server_class(app)
'''


def test_wsgi_custom_app_survives_its_own_errors(start_master, tmp_path):
    (tmp_path / "custom_wsgi_app.py").write_text(textwrap.dedent(CUSTOM_APP))
    master = start_master(app="custom_wsgi_app", workers=1, pythonpath=tmp_path)
    conn = open_connection(master.address())
    try:
        status, body = http_get(conn, "/first")
        first = json.loads(body)
        assert status == 200 and first["multiprocess"] is True and first["path"] == "/first"
        assert http_get(conn, "/fail")[0] == 500
        status, body = http_get(conn, "/after")
        assert status == 200 and json.loads(body)["pid"] == first["pid"]  # the same worker went on
    finally:
        conn.close()
    wait_until(lambda: "the app failed on purpose" in master.log(), 10.0,
               message=f"the app's traceback was not logged:\n{master.log()}")
    assert master.worker_pids() == {first["pid"]}
