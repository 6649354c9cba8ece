"""Static files and a health check over HTTP/1.1: workers.http1 parses, http.server answers. Runs in: worker.

Usage::

    prefork run workers.http --bind tcp://127.0.0.1:8000 --mode thread --threads 16
    curl -i http://127.0.0.1:8000/health                  # -> 200, body "ok"

    prefork.serve("workers.http", bind=["tcp://127.0.0.1:8000"], service_options={"root": "/srv/www"})

Without ``--bind`` the service listens on ``DEFAULT_BIND`` (tcp://127.0.0.1:8000); it serves TCP
and Unix stream listeners.

Service option (passed to ``configure()`` in each worker):

- ``root`` (default ``"."``): the directory to serve, resolved to an absolute path when the
  worker starts; a root that is not a directory stops the service with the app-load error
  (exit code 3). The module's own ``StreamHandler`` serves the worker's current directory.

What it serves:

- ``GET``/``HEAD /health``: 200 with the body ``ok`` (text/plain, not cached), without touching
  the disk, for load balancers and probes. A file named ``health`` at the root is shadowed.
- Any other ``GET``/``HEAD``: what ``http.server.SimpleHTTPRequestHandler`` serves: the file
  under ``root``, a directory's ``index.html`` or listing, 404 for what does not exist; paths
  cannot leave ``root``.
- HTTP/1.1 with keep-alive: every response carries its length, so a client can send several
  requests on one connection. A connection idle for ``KEEPALIVE_TIMEOUT`` seconds (also the
  limit for reading one request head; the ``read_timeout`` setting, if shorter) is closed, so
  idle or slow clients cannot hold a synchronous worker; use ``--mode thread`` to serve many
  keep-alive clients per worker.
- A response after which the server closes the connection (the client sent ``Connection:
  close``, an HTTP/1.0 request without keep-alive, any error) says ``Connection: close``, so
  clients such as wrk do not count the close as a failure; a kept-alive HTTP/1.0 connection
  is answered with ``Connection: keep-alive``.
- Requests are read by ``workers.http1`` (httptools): pipelining, the smuggling defences and the
  limits of the ``max_*`` settings (``configure(settings=...)``); a request it refuses gets its
  status (400, 413, 414, 431, 501, 505...) with ``Connection: close``. A request body (rare for
  static files) is skipped. ``Server: prefork``, without versions.

Logs go through ``logging``, never straight to stderr: one line per HTTP request on
``prefork.access.http`` at DEBUG (client, request line, status, size; prefork's own access_log
records each connection), http.server's diagnostics (bad requests, timeouts, the reason of an
error status) on ``prefork.workers.http`` at DEBUG, and an exception in a handler with its
traceback on ``prefork.workers.http`` at ERROR.

``HTTPServer`` and ``HTTPHandlerBase`` are also the base of ``workers.wsgi``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from prefork.accounting import stricter_timeout
from prefork.errors import AppLoadError
from prefork.servers import TCPServer
from workers.http1 import BadRequest, Connection, Limits, Request, limits_from

__all__ = ["DEFAULT_BIND", "KEEPALIVE_TIMEOUT", "HEALTH_PATH", "SERVER_NAME", "Service", "HTTPServer",
           "HeaderView", "HTTPHandlerBase", "StaticHandler", "static_handler", "StreamHandler", "server_class", "configure"]

DEFAULT_BIND = ["tcp://127.0.0.1:8000"]

# Seconds to wait for the next request on a kept-alive connection, and for one request head.
# A synchronous worker is held for that long by an idle client: short enough to free it soon,
# long enough for a browser's next request (nginx waits 75 s, gunicorn 2 s).
KEEPALIVE_TIMEOUT = 5.0

# After an error response the client may still be sending the rest of its request (a 431 is sent
# after 64 KiB of a 100 KB header): closing the socket with unread input resets the connection,
# and the reset can destroy the response before the client reads it. So the server half-closes
# and reads and discards what still comes, for at most this long and this much, before closing
# (nginx's lingering_close). A client that reads the response closes at once.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

# The Server header's value: the software, never its version or Python's (nothing to fingerprint).
SERVER_NAME = "prefork"

HEALTH_PATH = "/health"
HEALTH_BODY = b"ok"

log = logging.getLogger("prefork.workers.http")
access_log = logging.getLogger("prefork.access.http")

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True)
class Service:
    """What ``configure()`` returns: the handler and server class for stream listeners."""

    StreamHandler: type[BaseHTTPRequestHandler]
    server_class: type[TCPServer]


class HTTPServer(TCPServer):
    """http.server's HTTPServer on prefork's core: records ``server_name`` and ``server_port``.

    ``server_bind`` also runs on an adopted socket (``from_socket``), so a worker serving the
    master's listener has them too. Handler exceptions are logged, not printed.
    """

    allow_reuse_address = True  # as http.server's HTTPServer
    server_name: str
    server_port: int

    def server_bind(self) -> None:
        """Bind (unless adopted), then record the server's name and port."""
        super().server_bind()
        self.server_name, self.server_port = _name_and_port(self.server_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the exception a request raised; the server goes on."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            # The client reset or went away mid-request: routine, not a fault of the server.
            log.debug("client %s went away: %s", client_address, exc)
            return
        log.exception("error while serving %s", client_address)


def _drain_and_half_close(connection: socket.socket) -> None:
    """Send FIN after the response, then discard the client's input until it closes (or for
    LINGER_SECONDS, or LINGER_BYTES), so that closing does not reset the connection."""
    deadline = time.monotonic() + LINGER_SECONDS
    discarded = 0
    try:
        connection.shutdown(socket.SHUT_WR)
        while discarded < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = connection.recv(65536)
            if not chunk:
                return
            discarded += len(chunk)
    except OSError:
        pass  # reset, timed out or gone: closing is all that is left to do


def _name_and_port(address: Any) -> tuple[str, int]:
    """(fully qualified name, port) of a bound address, as http.server computes them.

    A Unix socket has neither: it is named ``localhost`` with port 0.
    """
    if isinstance(address, tuple):
        return socket.getfqdn(address[0]), int(address[1])
    return "localhost", 0


class HeaderView:
    """A request's headers as http.server's handlers read them (``in``, ``[]``, ``get``), any case."""

    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self._headers = headers

    def get_all(self, name: str, failobj: Any = None) -> list[str] | Any:
        wanted = name.lower()
        found = [value for key, value in self._headers if key.lower() == wanted]
        return found or failobj

    def get(self, name: str, failobj: Any = None) -> Any:
        found = self.get_all(name)
        return found[0] if found else failobj

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get_all(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._headers)


class HTTPHandlerBase(BaseHTTPRequestHandler):
    """HTTP/1.1 parsed by workers.http1 (httptools), keep-alive, TCP_NODELAY, logging through ``logging``.

    http.server's handler still writes the responses (``send_response``, ``send_header``...);
    each request is read by ``workers.http1.Connection``, then ``respond()`` answers it.
    """

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    timeout = KEEPALIVE_TIMEOUT
    limits = Limits()  # configure() gives a subclass the settings' limits
    # A worker hands a connection to this handler once its first request head is in (an empty
    # line ends it; a bare LF one is refused with a 400 at once): see prefork.parking.
    message_delimiter = (b"\n\r\n", b"\n\n")
    # Whether the response being written has a Connection header yet, and is a final one
    # (not "100 Continue"); set by send_response_only().
    _connection_said = False
    _final_response = False
    # Set by send_error(): drain the client's input before closing (LINGER_SECONDS).
    _linger = False
    http: Connection
    requestline = ""
    request_version = "HTTP/1.1"
    command = ""

    def setup(self) -> None:
        if not isinstance(self.client_address, tuple):
            self.client_address = ("", 0)  # a Unix stream peer has no address
        limit = stricter_timeout(self.request, self.timeout)
        super().setup()  # sets the connection's timeout to self.timeout
        self.connection.settimeout(limit)  # timeout is a ClassVar of http.server's handler: not set per instance
        if self.connection.family in _TCP_FAMILIES:
            # Headers and body are separate writes: without TCP_NODELAY, Nagle's algorithm and
            # the client's delayed ACK can hold the body back ~40 ms on a kept-alive connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.http = Connection(self.connection, self.limits)

    def handle_one_request(self) -> None:
        """Read one request, answer it, skip what is left of its body."""
        try:
            current = self.http.next_request()
        except BadRequest as exc:
            self.refuse(exc)
            return
        except TimeoutError as exc:
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True
            return
        if current is None:
            self.close_connection = True
            return
        self.take(current)
        try:
            self.respond(current)
        except BadRequest as exc:  # the body turned out bad while the handler read it
            if not self._final_response:
                self.refuse(exc)
            self.close_connection = True
        self.wfile.flush()
        if not self.http.finish_request(keep_alive=not self.close_connection):
            self.close_connection = True

    def take(self, current: Request) -> None:
        """Set http.server's attributes of the request being answered."""
        self.command, self.path, self.request_version = current.method, current.target, current.version
        self.requestline = current.request_line
        self.raw_requestline = self.requestline.encode("latin-1")
        self.headers = HeaderView(current.headers)  # type: ignore[assignment]
        self.close_connection = not current.keep_alive
        self._final_response = False

    def refuse(self, exc: BadRequest) -> None:
        """Answer a request that cannot be served with *exc*'s status; the connection closes."""
        self.close_connection = True
        self.log_error("refused with %d: %s", exc.status, exc.reason)
        self.send_error(exc.status, None, exc.reason)

    def respond(self, current: Request) -> None:
        """Answer *current* with its ``do_METHOD``, or 501."""
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return
        method()

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self._linger = True
        super().send_error(code, message, explain)

    def finish(self) -> None:
        super().finish()  # flushes the response
        if self._linger:
            _drain_and_half_close(self.connection)

    def send_response_only(self, code: int, message: str | None = None) -> None:
        super().send_response_only(code, message)
        self._connection_said = False
        self._final_response = int(code) >= HTTPStatus.OK

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection":
            self._connection_said = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        """Say what becomes of the connection where the client cannot assume it: a close, or
        keep-alive to an HTTP/1.0 client."""
        if self._final_response and not self._connection_said:
            if self.close_connection:
                self.send_header("Connection", "close")
            elif self.request_version == "HTTP/1.0":
                self.send_header("Connection", "keep-alive")
        super().end_headers()

    def peer(self) -> str:
        return str(self.client_address[0]) or "unix"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if isinstance(code, HTTPStatus):
            code = code.value
        access_log.debug('%s "%s" %s %s', self.peer(), self.requestline, code, size)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        # send_error() reports every 4xx/5xx here and the access line already has the status.
        log.debug("%s " + format, self.peer(), *args)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        access_log.debug("%s " + format, self.peer(), *args)


class StaticHandler(HTTPHandlerBase, SimpleHTTPRequestHandler):
    """Serves the files under ``root`` (the current directory when None) and ``/health``."""

    root: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("directory", self.root)
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        if self.is_health_check():
            self.send_health(with_body=True)
        else:
            super().do_GET()

    def do_HEAD(self) -> None:
        if self.is_health_check():
            self.send_health(with_body=False)
        else:
            super().do_HEAD()

    def is_health_check(self) -> bool:
        return urlsplit(self.path).path == HEALTH_PATH

    def send_health(self, with_body: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(HEALTH_BODY)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(HEALTH_BODY)


def static_handler(root: str, limits: Limits | None = None) -> type[StaticHandler]:
    """A StaticHandler class serving *root*, which must be a directory, within *limits*."""
    directory = os.path.abspath(root)
    if not os.path.isdir(directory):
        raise AppLoadError(f"workers.http: option root={root!r}: {directory} is not a directory")

    class RootedStaticHandler(StaticHandler):
        root = directory

    RootedStaticHandler.limits = limits or Limits()
    return RootedStaticHandler


def configure(root: str = ".", settings: Any = None) -> Service:
    """Called in each worker: the service that serves *root*, with the HTTP limits of *settings*."""
    return Service(StreamHandler=static_handler(root, limits_from(settings)), server_class=HTTPServer)


# Used as they are by ``prefork.serve("workers.http")`` when no service option is given.
StreamHandler = StaticHandler
server_class = HTTPServer
