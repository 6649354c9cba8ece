"""Locust users for prefork's bundled services. Runs in: locust (a load generator, not a server).

Pick the users by class name after the options; ``--host`` is the service's address::

    locust --config loadtests/locust.conf --host tcp://127.0.0.1:9000 TcpEchoUser TcpPersistentEchoUser
    locust --config loadtests/locust.conf --host udp://127.0.0.1:9000 UdpEchoUser
    locust --config loadtests/locust.conf --host unix:/tmp/echo.sock UnixEchoUser
    locust --config loadtests/locust.conf --host http://127.0.0.1:8000 HttpHealthUser
    locust --config loadtests/locust.conf --host http://127.0.0.1:8000 WsgiUser

Echo users (``workers.echo``: a line goes out, the same line comes back) use ``EchoClient``
(``loadtests.load``'s ``Conversation`` and ``Datagrams``), which times each request and fires
locust's request event (the custom-client pattern), so they appear in the same statistics, CSV
and HTML reports as HTTP users; a request fails on an error, a timeout or a wrong reply. Under
locust, ``socket`` is gevent's, so a blocking call yields to the other users. HTTP users
(``workers.http``, ``--wsgi`` apps) are plain ``HttpUser``; ``HttpHealthUser`` keeps its
connection alive, ``HttpCloseUser`` opens one per request (``Connection: close``).

Connections and synchronous workers: a synchronous worker serves one connection from accept to
close. Users that keep connections open therefore reopen them every ``REQUESTS_PER_CONNECTION``
requests (``PREFORK_LOAD_REQUESTS_PER_CONNECTION`` overrides it), so more users than workers
share the workers instead of waiting for ever; run the server with ``--mode thread`` to serve
connections that never close.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from locust import HttpUser, User, constant, task

# locust puts this file's directory on sys.path, not the repository root; the clients live in
# the loadtests package beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.load import SOCKET_TIMEOUT, Conversation, Datagrams  # noqa: E402
from prefork.bindspec import parse_bind  # noqa: E402

__all__ = ["TcpEchoUser", "TcpPersistentEchoUser", "UdpEchoUser", "UnixEchoUser", "UnixPersistentEchoUser",
           "UnixDatagramEchoUser", "HttpHealthUser", "HttpCloseUser", "WsgiUser"]

# Requests on one kept-open connection before it is reopened (see the module docstring).
REQUESTS_PER_CONNECTION = int(os.environ.get("PREFORK_LOAD_REQUESTS_PER_CONNECTION", "100"))
# What every echo request sends: short, so the test measures the runtime, not the bytes.
LINE = b"hello from locust"


class EchoMismatch(Exception):
    """The server answered, but not with what was sent."""


class EchoClient:
    """One user's sockets on *spec* (``tcp://``, ``udp://``, ``unix:``, ``unix-dgram:``); *fire* gets every request.

    A kept-open stream is reopened after *requests_per_connection* requests, and after a failure.
    """

    def __init__(self, spec: str, fire: Callable[..., Any], requests_per_connection: int) -> None:
        bind = parse_bind(spec)
        self.kind, self.address, self.fire = bind.scheme, bind.address, fire
        unix = bind.scheme.startswith("unix")
        self.family = socket.AF_UNIX if unix else socket.AF_INET6 if ":" in bind.address[0] else socket.AF_INET
        self.requests_per_connection = requests_per_connection
        self._stream: Conversation | None = None
        self._used = 0
        self._datagrams: Datagrams | None = None

    def short(self, line: bytes) -> None:
        self._timed("short", lambda: _checked(self._connect(), line, close=True))

    def persistent(self, line: bytes) -> None:
        self._timed("persistent", lambda: self._persistent(line))

    def datagram(self, payload: bytes) -> None:
        if self._datagrams is None:
            self._datagrams = Datagrams(self.address, self.family, SOCKET_TIMEOUT)
        self._timed("datagram", lambda: len(self._datagrams.reply(payload)))  # type: ignore[union-attr]

    def close(self) -> None:
        self._close_stream()
        if self._datagrams is not None:
            self._datagrams.close()

    def _timed(self, name: str, call: Callable[[], int]) -> None:
        start, length, exception = time.perf_counter(), 0, None
        try:
            length = call()
        except (OSError, EchoMismatch) as exc:  # timeouts and resets are OSErrors: the request failed
            exception = exc
            self._close_stream()  # a failed exchange leaves the connection in an unknown state
        self.fire(request_type=self.kind, name=name, response_time=(time.perf_counter() - start) * 1000,
                  response_length=length, exception=exception, context={})

    def _connect(self) -> Conversation:
        return Conversation(self.address, self.family, SOCKET_TIMEOUT)

    def _persistent(self, line: bytes) -> int:
        if self._stream is None:
            self._stream, self._used = self._connect(), 0
        length = _checked(self._stream, line)
        self._used += 1
        if self._used >= self.requests_per_connection:
            self._close_stream()
        return length

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _checked(conversation: Conversation, line: bytes, close: bool = False) -> int:
    """Send *line* and read its echo; the reply's length, EchoMismatch unless it is the line."""
    try:
        reply = conversation.reply(line + b"\n")
    finally:
        if close:
            conversation.close()
    if reply != line + b"\n":
        raise EchoMismatch(f"sent {line[:80]!r}, got {reply[:80]!r}")
    return len(reply)


class EchoUser(User):
    """Base of the echo users: one EchoClient per user on ``--host``; no pause between requests."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        if not self.host:
            raise ValueError(f"{type(self).__name__} needs --host (tcp://, udp://, unix:, unix-dgram:)")
        self.client = EchoClient(self.host, self.environment.events.request.fire, REQUESTS_PER_CONNECTION)

    def on_stop(self) -> None:
        self.client.close()


class TcpEchoUser(EchoUser):
    """Short TCP connections: connect, one line, echo, close."""

    @task
    def short(self) -> None:
        self.client.short(LINE)


class TcpPersistentEchoUser(EchoUser):
    """A line at a time on a kept-open TCP connection."""

    @task
    def persistent(self) -> None:
        self.client.persistent(LINE)


class UdpEchoUser(EchoUser):
    """One datagram out, the same back."""

    @task
    def datagram(self) -> None:
        self.client.datagram(LINE)


class UnixEchoUser(TcpEchoUser):
    """Short connections to a Unix stream socket (``--host unix:PATH``)."""


class UnixPersistentEchoUser(TcpPersistentEchoUser):
    """A kept-open connection to a Unix stream socket (``--host unix:PATH``)."""


class UnixDatagramEchoUser(UdpEchoUser):
    """Datagrams to a Unix datagram socket (``--host unix-dgram:PATH``)."""


class HttpBase(HttpUser):
    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        self.requests_on_connection = 0

    def get(self, path: str, name: str | None = None, close: bool = False) -> None:
        """GET *path*; the connection is closed after it if *close* or after REQUESTS_PER_CONNECTION.

        Closing says ``Connection: close`` (the server closes after its response) and drops the
        session's pooled connection at once: http.client looks only at the response's headers
        to decide whether a connection may be reused, so otherwise the next request could go
        out on the socket the server is closing and fail with RemoteDisconnected.
        """
        self.requests_on_connection += 1
        close = close or self.requests_on_connection >= REQUESTS_PER_CONNECTION
        headers = {"Connection": "close"} if close else None
        self.client.get(path, name=name, headers=headers, timeout=SOCKET_TIMEOUT)
        if close:
            self.client.close()  # the session opens a new connection for its next request
            self.requests_on_connection = 0


class HttpHealthUser(HttpBase):
    """``GET /health`` of ``workers.http``, keep-alive."""

    @task
    def health(self) -> None:
        self.get("/health")


class HttpCloseUser(HttpBase):
    """``GET /health`` of ``workers.http``, a new connection for every request."""

    @task
    def health(self) -> None:
        self.get("/health", name="/health (close)", close=True)


class WsgiUser(HttpBase):
    """``GET /`` of a WSGI app (``prefork run --wsgi``; the bundled hello app by default), keep-alive."""

    @task
    def hello(self) -> None:
        self.get("/")
