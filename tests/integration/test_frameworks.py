"""Flask and Django apps under real masters (``prefork run --wsgi``'s service): one master per framework."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import uuid
from typing import Any, Iterator

import pytest

from tests.integration.conftest import Master
from tests.support import SOCKET_TIMEOUT, recv_all, wait_until

pytestmark = pytest.mark.integration

APPS = {"flask": "tests.integration.flask_app:app", "django": "tests.integration.django_app:app"}


@pytest.fixture(scope="module", params=sorted(APPS))
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    """A master serving one framework's app with workers.wsgi, as ``prefork run --wsgi`` does."""
    pytest.importorskip(request.param)
    master = Master(tmp_path_factory.mktemp(request.param), "workers.wsgi", ["tcp://127.0.0.1:0"], workers=2,
                    service_options={"app": APPS[request.param]})
    try:
        yield master.wait_ready()
    finally:
        master.kill_group()


def connect(master: Master) -> http.client.HTTPConnection:
    host, port = master.address()
    return http.client.HTTPConnection(host, port, timeout=SOCKET_TIMEOUT)


def fetch(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


def test_routing_and_keep_alive_across_requests(site):
    conn = connect(site)
    try:
        first, body = fetch(conn, "GET", "/")
        sock = conn.sock
        items = [json.loads(fetch(conn, "GET", f"/items/{n}?q=x{n}")[1]) for n in range(5)]
        missing, _ = fetch(conn, "GET", "/no/such/page")
        assert conn.sock is sock  # one connection for all seven requests
    finally:
        conn.close()
    assert first.status == 200 and body.endswith(b" home") and first.getheader("Date")
    assert [(i["number"], i["query"]) for i in items] == [(n, f"x{n}") for n in range(5)]
    assert len({i["pid"] for i in items}) == 1 and missing.status == 404


def test_form_and_json_posts(site):
    conn = connect(site)
    try:
        form, form_body = fetch(conn, "POST", "/form", "name=Ada&lang=en",
                                {"Content-Type": "application/x-www-form-urlencoded"})
        posted, json_body = fetch(conn, "POST", "/json", json.dumps({"a": [1, 2]}),
                                  {"Content-Type": "application/json"})
    finally:
        conn.close()
    assert form.status == 200 and json.loads(form_body) == {"name": "Ada", "lang": "en"}
    assert posted.status == 200 and json.loads(json_body) == {"got": {"a": [1, 2]}}


def test_multipart_upload_sent_chunked(site):
    content = bytes(range(256)) * 800  # 200 KiB, binary
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nreport\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i:i + 7000] for i in range(0, len(body), 7000)]
    conn = connect(site)
    try:
        conn.putrequest("POST", "/upload")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for piece in pieces:
            conn.send(b"%x\r\n%b\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        answer = json.loads(response.read())
        again, _ = fetch(conn, "GET", "/")  # the chunked body ended where it should
    finally:
        conn.close()
    assert response.status == 200, answer
    assert answer == {"files": {"file": hashlib.sha256(content).hexdigest()}, "fields": {"title": "report"}}
    assert again.status == 200


def test_streamed_response_is_chunked(site):
    host, port = site.address()
    with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = recv_all(sock)
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    body, _, second = rest.partition(b"0\r\n\r\n")
    assert b"".join(body.split(b"\r\n")[1::2]) == b"".join(b"line %d\n" % n for n in range(5))
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_failing_view_gives_500_and_its_traceback_is_logged(site):
    conn = connect(site)
    try:
        response, _ = fetch(conn, "GET", "/boom")
        after, _ = fetch(conn, "GET", "/")
    finally:
        conn.close()
    assert response.status == 500 and after.status == 200
    wait_until(lambda: "view failed on purpose" in site.log(), SOCKET_TIMEOUT, message=site.log())
    assert "Traceback (most recent call last)" in site.log()
