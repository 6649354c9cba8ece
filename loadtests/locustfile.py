"""Locust users for prefork's bundled services. Runs in: locust (a load generator, not a server).

Pick the users by class name after the options; ``--host`` is the service's address::

    locust --config loadtests/locust.conf --host tcp://127.0.0.1:9000 TcpEchoUser TcpPersistentEchoUser
    locust --config loadtests/locust.conf --host udp://127.0.0.1:9000 UdpEchoUser
    locust --config loadtests/locust.conf --host unix:/tmp/echo.sock UnixEchoUser
    locust --config loadtests/locust.conf --host http://127.0.0.1:8000 HttpHealthUser
    locust --config loadtests/locust.conf --host http://127.0.0.1:8000 WsgiUser

Echo users (``workers.echo``) use ``loadtests.socket_client.EchoClient``, which reports each
request through locust's request event (the custom-client pattern), so they appear in the same
statistics, CSV and HTML reports as HTTP users. HTTP users (``workers.http``, ``--wsgi`` apps)
are plain ``HttpUser``; ``HttpHealthUser`` keeps its connection alive, ``HttpCloseUser`` opens one
per request (``Connection: close``).

Connections and synchronous workers: a synchronous worker serves one connection from accept to
close. Users that keep connections open therefore reopen them every ``REQUESTS_PER_CONNECTION``
requests (``PREFORK_LOAD_REQUESTS_PER_CONNECTION`` overrides it), so more users than workers
share the workers instead of waiting for ever; run the server with ``--mode thread`` to serve
connections that never close.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from locust import HttpUser, User, constant, task

# locust puts this file's directory on sys.path, not the repository root; the client lives in
# the loadtests package beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.socket_client import SOCKET_TIMEOUT, EchoClient  # noqa: E402

__all__ = ["TcpEchoUser", "TcpPersistentEchoUser", "UdpEchoUser", "UnixEchoUser", "UnixPersistentEchoUser",
           "UnixDatagramEchoUser", "HttpHealthUser", "HttpCloseUser", "WsgiUser"]

# Requests on one kept-open connection before it is reopened (see the module docstring).
REQUESTS_PER_CONNECTION = int(os.environ.get("PREFORK_LOAD_REQUESTS_PER_CONNECTION", "100"))
# What every echo request sends: short, so the test measures the runtime, not the bytes.
LINE = b"hello from locust"


class EchoUser(User):
    """Base of the echo users: one EchoClient per user on ``--host``; no pause between requests."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        if not self.host:
            raise ValueError(f"{type(self).__name__} needs --host (tcp://, udp://, unix:, unix-dgram:)")
        self.client = EchoClient(self.host, self.environment.events.request.fire,
                                 requests_per_connection=REQUESTS_PER_CONNECTION)

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
