"""Misbehaving clients against real masters: silent, resetting, empty and huge datagrams, garbage
and huge HTTP heads. None of them may crash a worker or disturb the other clients.

Promises checked (README "Settings": read_timeout; "Bundled services": workers.echo, workers.http):

- A connection that stays silent longer than ``read_timeout`` is dropped and its worker serves
  the next client (workers.echo and workers.http keep their own, longer, idle limits otherwise).
- A client that resets the connection in the middle of a request is logged at DEBUG and
  forgotten; the worker goes on and concurrent clients see no failure.
- workers.echo answers an empty datagram with an empty one and the largest IPv4 datagram with
  itself, and goes on answering.
- workers.http answers binary garbage, a 100 KB request line, a 100 KB header and too many
  headers with a 4xx that says ``Connection: close`` (400, 414, 431), logs each one, and a
  concurrent /health load sees no failure. Any response after which it closes the connection
  says ``Connection: close``; a kept-alive HTTP/1.0 connection is told ``keep-alive``.
- workers.echo over TCP gives back any bytes it is sent, whatever their framing (property).
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from prefork.accounting import client_text
from tests.integration.conftest import Master
from tests.support import SOCKET_TIMEOUT, datagram_request, recv_all, stream_request, wait_until

pytestmark = pytest.mark.reliability

# The read_timeout of the silent-client tests: short, so the tests are quick; below the
# services' own idle limits (workers.echo 300 s, workers.http 5 s) and the clients' timeouts.
READ_TIMEOUT = 1.0
# How soon the next client must be served: sooner than SILENT_TIMEOUT (the read_timeout of the
# client that says nothing at all), so a worker held by the silent client fails the test.
SERVED_WITHIN = 2.0
SILENT_TIMEOUT = 3.0
# Requests the concurrent load must complete after the misbehaving clients, to show it goes on.
PROGRESS = 20
# Resetting clients per test.
RESETS = 10
# The largest UDP payload over IPv4: 65535 - 20 (IP header) - 8 (UDP header).
MAX_UDP_IPV4 = 65507
# A "huge" request line or header: beyond http.server's 64 KiB limit for one line.
HUGE = 100_000
# Over http.server's limit of 100 headers.
TOO_MANY_HEADERS = 200


def busy_with(master: Master, sock: socket.socket) -> bool:
    """Whether a worker is serving the connection of *sock* right now (per the scoreboard)."""
    me = client_text(sock.getsockname())
    return any(view.client == me and view.state_name == "busy" for view in master.workers())


def done_with(master: Master, sock_name: str) -> bool:
    return not any(view.client == sock_name and view.state_name == "busy" for view in master.workers())


# -- a client that says nothing -------------------------------------------------------------------

SILENT_APPS = [
    pytest.param("tests.integration.apps", b"pid\n", id="plain-handler"),
    pytest.param("workers.echo", b"hello\n", id="echo"),
    pytest.param("workers.http", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
]


@pytest.mark.parametrize("app, payload", SILENT_APPS)
def test_a_silent_client_never_holds_the_worker_and_is_closed_after_read_timeout(
        start_master: Any, app: str, payload: bytes) -> None:
    master = start_master(app=app, workers=1, read_timeout=SILENT_TIMEOUT, loglevel="debug")
    (worker,) = master.worker_pids()
    with socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT) as silent:
        # The silent client waits in the worker's poller, not in a handler: the next client is
        # served at once, well before read_timeout (which it had to wait for when the worker
        # took the silent client into a handler).
        reply = exchange_closing(master.address(), _closing(payload), SERVED_WITHIN)
        assert not busy_with(master, silent)
        assert silent.recv(1) == b"", "the silent connection should have been closed by the server"
    check_reply(app, reply, _closing(payload), worker)
    wait_until(lambda: f"no complete first message within {SILENT_TIMEOUT:g}s" in master.log(), 10,
               message=master.log())
    assert "Traceback" not in master.log()
    assert master.worker_pids() == {worker}


@pytest.mark.parametrize("app, payload", SILENT_APPS)
def test_a_client_silent_after_its_first_request_is_dropped_after_read_timeout_and_the_worker_serves_the_next(
        start_master: Any, app: str, payload: bytes) -> None:
    master = start_master(app=app, workers=1, read_timeout=READ_TIMEOUT, loglevel="debug")
    (worker,) = master.worker_pids()
    with socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT) as silent:
        silent.sendall(payload)
        wait_until(lambda: busy_with(master, silent), 10, message="the worker never took the silent client")
        # Queued behind the silent client on the only worker: served once it is dropped. Without
        # read_timeout the service's own limit applies (300 s for echo) and this times out.
        reply = exchange_closing(master.address(), _closing(payload), SERVED_WITHIN)
        assert silent.recv(1) != b"", "the first request should have been answered"
    check_reply(app, reply, _closing(payload), worker)
    if app == "tests.integration.apps":
        # A routine event: one line naming the client and the setting, no traceback.
        wait_until(lambda: "(read_timeout): connection closed" in master.log(), 10, message=master.log())
        assert "Traceback" not in master.log()
    elif app == "workers.echo":
        assert f"idle for {READ_TIMEOUT} s" in master.log()
    else:
        assert "Request timed out" in master.log()
    assert master.worker_pids() == {worker}, "the worker was replaced instead of freed"


def _closing(payload: bytes) -> bytes:
    """*payload* as a request after which workers.http closes the connection."""
    return payload.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")


def exchange_closing(address: Any, payload: bytes, timeout: float) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def check_reply(app: str, reply: bytes, payload: bytes, worker: int) -> None:
    if app == "tests.integration.apps":
        assert reply == f"{worker}\n".encode()
    elif app == "workers.echo":
        assert reply == payload
    else:
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok")


# -- a client that resets mid-request --------------------------------------------------------------


class HealthProbe:
    """What the integration suite's Load needs of a master, asking GET /health over HTTP: so
    load(HealthProbe(master)) runs its threaded, bounded, failure-counting load against
    workers.http. A reply other than 200 "ok" comes back as the status, which Load counts."""

    def __init__(self, master: Master) -> None:
        self.host, self.port = master.address()

    def request(self, line: bytes) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=SOCKET_TIMEOUT)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        except http.client.HTTPException as exc:  # Load counts OSErrors as failures
            raise ConnectionError(repr(exc)) from exc
        finally:
            conn.close()
        return body if response.status == 200 else str(response.status).encode()


def reset_mid_request(master: Master, partial: bytes) -> None:
    """Send the start of a request, wait until a worker is reading it, then reset (RST)."""
    sock = socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT)
    name = client_text(sock.getsockname())
    try:
        sock.sendall(partial)
        wait_until(lambda: busy_with(master, sock), 10, message=f"no worker took {name}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    finally:
        sock.close()
    wait_until(lambda: done_with(master, name), 10, message=f"a worker is still busy with {name} after its reset")


# A first request, which hands the connection to a handler (before it, a connection waits in the
# worker's poller and its reset is silent), then the start of a second one.
@pytest.mark.parametrize("app, partial", [
    pytest.param("workers.echo", b"a first line\na line that never ends", id="echo"),
    pytest.param("workers.http", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nX-Half: ",
                 id="http"),
])
def test_a_client_resetting_mid_request_is_logged_and_harms_no_one(start_master: Any, load: Any, app: str,
                                                                    partial: bytes) -> None:
    master = start_master(app=app, workers=2, loglevel="debug")
    workers = master.worker_pids()
    running = load(HealthProbe(master), clients=2, line=b"ok") if app == "workers.http" else load(master, clients=2)
    running.wait_requests(PROGRESS)
    for _ in range(RESETS):
        reset_mid_request(master, partial)
    running.wait_requests(PROGRESS)
    running.stop()
    assert running.failures == []
    assert master.worker_pids() == workers, "a worker died of a reset"
    log = master.log()
    assert "went away" in log and "Traceback" not in log


# -- datagrams --------------------------------------------------------------------------------------


def test_empty_and_largest_datagrams_are_echoed_and_the_service_goes_on(start_master: Any) -> None:
    master = start_master(app="workers.echo", bind=["udp://127.0.0.1:0"], workers=1)
    workers = master.worker_pids()
    largest = os.urandom(MAX_UDP_IPV4)
    for _ in range(3):
        assert datagram_request(master.address(), b"") == b""
        assert datagram_request(master.address(), largest) == largest
    assert datagram_request(master.address(), b"still there") == b"still there"
    assert master.worker_pids() == workers


# -- garbage and huge heads to workers.http ------------------------------------------------------------


def http_exchange(address: Any, payload: bytes) -> bytes:
    """Send *payload*, half-close, and read until the server closes (a reset ends the read too)."""
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            return recv_all(sock)
        except ConnectionResetError:
            return b"<reset>"


def head_of(reply: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of a raw HTTP/1.x response."""
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1")
    status_line, *lines = head.split("\r\n")
    assert status_line.startswith("HTTP/1."), f"not an HTTP/1.x response: {reply[:200]!r}"
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers


BAD_HEADS = [
    pytest.param(b"\x00\xff\xfe garbage \x80\r\n\r\n", 400, "Invalid method", id="binary-garbage"),
    pytest.param(bytes(range(256)).replace(b"\n", b"") * 16, 400, "Invalid method", id="binary-no-newline"),
    pytest.param(b"GET / HTTX/1.1\r\n\r\n", 400, "Expected HTTP/", id="bad-version"),
    pytest.param(b"GET /" + b"a" * HUGE + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request target too long",
                 id="huge-request-line"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * HUGE + b"\r\n\r\n", 431,
                 "request head too large", id="huge-header"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(TOO_MANY_HEADERS))
                 + b"\r\n", 431, "too many header fields", id="too-many-headers"),
]


@pytest.fixture
def http_master(start_master: Any, tmp_path: Path) -> Master:
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("static hello")
    master: Master = start_master(app="workers.http", workers=2, loglevel="debug",
                                  service_options={"root": str(site)})
    return master


@pytest.mark.parametrize("payload, status, logged", BAD_HEADS)
def test_garbage_and_huge_heads_get_a_4xx_that_closes_and_others_are_unaffected(
        http_master: Master, load: Any, payload: bytes, status: int, logged: str) -> None:
    workers = http_master.worker_pids()
    running = load(HealthProbe(http_master), clients=2, line=b"ok")
    running.wait_requests(PROGRESS)
    for _ in range(3):
        got, headers = head_of(http_exchange(http_master.address(), payload))
        assert (got, headers.get("connection")) == (status, "close")
    running.wait_requests(PROGRESS)
    running.stop()
    assert running.failures == []
    assert http_master.worker_pids() == workers
    wait_until(lambda: f"refused with {status}: {logged}" in http_master.log(), 10,
               message=f"'code {status}' not logged:\n{http_master.log()[-3000:]}")


# -- Connection: close ---------------------------------------------------------------------------------


def exchange(sock: socket.socket, request: bytes) -> http.client.HTTPResponse:
    """Send one request on *sock* and read its whole response."""
    sock.sendall(request)
    method = request.split(b" ", 1)[0].decode()
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    response.read()
    return response


@pytest.mark.parametrize("request_head, status, connection", [
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200, "close", id="1.1-close"),
    pytest.param(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200, "close",
                 id="1.1-close-file"),
    pytest.param(b"HEAD /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200, "close",
                 id="1.1-close-head"),
    pytest.param(b"GET /health HTTP/1.0\r\n\r\n", 200, "close", id="1.0"),
    pytest.param(b"GET /hello.txt HTTP/1.0\r\n\r\n", 200, "close", id="1.0-file"),
    pytest.param(b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "close", id="1.1-error"),
    pytest.param(b"GET / HTTP/2.0\r\n\r\n", 505, "close", id="bad-version"),
    pytest.param(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 200, "keep-alive", id="1.0-keep-alive"),
    pytest.param(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n", 200, None, id="1.1-keep-alive"),
])
def test_a_response_says_whether_the_connection_is_closed_after_it(
        http_master: Master, request_head: bytes, status: int, connection: str | None) -> None:
    with socket.create_connection(http_master.address(), timeout=SOCKET_TIMEOUT) as sock:
        response = exchange(sock, request_head)
        assert (response.status, response.getheader("Connection")) == (status, connection)
        if connection == "close":
            assert sock.recv(1) == b"", "the server said close but kept the connection open"
        else:  # kept open: a second request is answered on the same connection
            assert exchange(sock, request_head).status == status


# -- echo returns what it is sent (property) -----------------------------------------------------------

# Any bytes, with line ends of every kind anywhere (random bytes alone seldom hold "\r\n");
# and at most one long run, beyond workers.echo's 64 KiB pieces (bounded so that what is in
# flight fits the loopback socket buffers while the client is still sending).
_FRAGMENTS = st.lists(st.one_of(st.binary(max_size=200),
                                st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"\x00", b"\xff"])),
                      max_size=20).map(b"".join)
_LONG_RUN = st.builds(lambda piece, times: piece * times, st.binary(min_size=1, max_size=64), st.integers(1, 3000))
ECHO_PAYLOADS = st.tuples(_FRAGMENTS, st.one_of(st.just(b""), _LONG_RUN), _FRAGMENTS).map(b"".join)


def test_echo_gives_back_any_bytes_it_is_sent(start_master: Any) -> None:
    master = start_master(app="workers.echo", workers=1)

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(payload=ECHO_PAYLOADS)
    def echoed(payload: bytes) -> None:
        assert stream_request(master.address(), payload) == payload

    echoed()
