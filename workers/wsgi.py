"""Any WSGI application over HTTP/1.1, on prefork's core and wsgiref's handlers. Runs in: worker.

Usage::

    prefork run --wsgi myapp:app --bind tcp://127.0.0.1:8000 --workers 2
    prefork run workers.wsgi                  # the built-in hello app on DEFAULT_BIND
    curl http://127.0.0.1:8000/                # -> Hello, World!

    prefork.serve("workers.wsgi", bind=["unix:/run/app.sock"], service_options={"app": "myapp:app"})

Without ``--bind`` the service listens on ``DEFAULT_BIND`` (tcp://127.0.0.1:8000); it serves TCP
and Unix stream listeners.

Service option (passed to ``configure()`` in each worker, which is where the app is imported,
so a reload loads new code):

- ``app`` (default ``"workers.wsgi:hello"``): the WSGI callable, as ``'module:attribute'`` (or the
  callable itself through the Python API). An app that cannot be imported, or is not callable,
  stops the service with the app-load error (exit code 3).

How requests are served (PEP 3333, by wsgiref's ``ServerHandler``):

- ``WSGIServer`` is wsgiref's server rebuilt on ``prefork.servers.TCPServer``: its
  ``server_bind`` (which also runs on a socket adopted from the master) builds the base environ.
  ``wsgi.multiprocess`` is true, ``wsgi.multithread`` is true in thread mode.
- HTTP/1.1 keep-alive: a connection stays open while every response is delimited. A response
  without ``Content-Length`` (a single-string body gets one computed, as wsgiref does) is sent
  with ``Connection: close`` and ends the connection; so do a body shorter than its declared
  length, an app that fails after sending its headers, and ``Connection: close`` from the client.
  HTTP/1.0 clients get keep-alive when they ask for it. ``HEAD`` responses never carry a body,
  whatever the app returns. An idle connection is closed after ``KEEPALIVE_TIMEOUT`` seconds.
- ``wsgi.input`` ends at the request's ``Content-Length``, so ``read()`` never blocks on the next
  request; what the app leaves unread is skipped (up to ``MAX_DISCARD`` bytes, else the
  connection is closed). Chunked request bodies are refused with 411 Length Required.
- An exception in the app gives a 500 (if no header was sent yet), its traceback is logged on
  ``prefork.workers.wsgi`` at ERROR and the worker goes on. Requests are logged on
  ``prefork.access.http``, as by ``workers.http``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import IO, Any, Callable, Iterator, cast
from wsgiref import simple_server
from wsgiref.headers import Headers
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prefork.errors import AppLoadError
from prefork.loader import load_object
from prefork.mixins import ThreadingMixIn
from workers.http import HTTPHandlerBase, HTTPServer, Service

__all__ = ["DEFAULT_BIND", "MAX_DISCARD", "hello", "RequestBody", "WSGIServer", "ServerHandler",
           "WSGIRequestHandler", "wsgi_server_class", "StreamHandler", "server_class", "configure"]

DEFAULT_BIND = ["tcp://127.0.0.1:8000"]

# Unread request body the worker skips to keep a connection alive; beyond this, closing the
# connection is cheaper than reading (and the client is likely still uploading).
MAX_DISCARD = 64 * 1024

# Longest request line accepted, as http.server and wsgiref (longer: 414 URI Too Long).
_MAX_REQUEST_LINE = 65536

log = logging.getLogger("prefork.workers.wsgi")


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    """The built-in app: ``Hello, World!`` with its Content-Length, for any path and method."""
    body = b"Hello, World!\n"
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]


class WSGIServer(HTTPServer):
    """wsgiref's WSGIServer on prefork's core: ``base_environ``, ``get_app()``/``set_app()``."""

    application: WSGIApplication | None = None
    base_environ: dict[str, str]

    def server_bind(self) -> None:
        """Bind (unless adopted), record name and port, then build the base environ."""
        super().server_bind()
        self.setup_environ()

    def setup_environ(self) -> None:
        self.base_environ = {
            "SERVER_NAME": self.server_name,
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PORT": str(self.server_port),
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            "SCRIPT_NAME": "",
        }

    def get_app(self) -> WSGIApplication | None:
        return self.application

    def set_app(self, application: WSGIApplication) -> None:
        self.application = application


def wsgi_server_class(app: WSGIApplication) -> type[WSGIServer]:
    """A WSGIServer class whose instances serve *app* (serve() builds servers from a class)."""

    class AppWSGIServer(WSGIServer):
        application = staticmethod(app)  # a plain function would become a bound method

    return AppWSGIServer


class RequestBody:
    """``wsgi.input``: the request body, never read past its Content-Length."""

    def __init__(self, rfile: Any, length: int) -> None:
        self._rfile = rfile
        self.remaining = length

    def read(self, size: int | None = -1) -> bytes:
        return self._take(self._rfile.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._take(self._rfile.readline, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _take(self, reader: Callable[[int], bytes], size: int | None) -> bytes:
        limit = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = reader(limit) if limit else b""
        # A short read means the client closed early: there is nothing more to come.
        self.remaining = self.remaining - len(data) if len(data) == limit else 0
        return data


class ServerHandler(simple_server.ServerHandler):
    """wsgiref's ServerHandler answering in HTTP/1.1 and deciding whether the connection lives on."""

    http_version = "1.1"
    request_handler: WSGIRequestHandler
    request_body: RequestBody
    # Set by wsgiref's BaseHandler, which typeshed leaves undeclared.
    headers: Headers
    environ: dict[str, Any]
    bytes_sent: int
    # True once the response was sent whole (the app's or the 500 that replaced it).
    completed = False
    _head_only = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        """wsgiref's, on a copy of *headers*: the app's own list (often a module-level constant,
        passed on every call) is never changed, whatever this handler adds to its response."""
        return super().start_response(status, list(headers), exc_info)

    def cleanup_headers(self) -> None:
        super().cleanup_headers()  # adds Content-Length to a one-string body
        peer = self.request_handler
        if "Content-Length" not in self.headers:
            peer.close_connection = True  # the body ends where the connection does
        if self.request_body.remaining > MAX_DISCARD:
            peer.close_connection = True  # too much unread body to skip afterwards: say so now
        if peer.close_connection:
            self.headers["Connection"] = "close"
        elif peer.request_version == "HTTP/1.0":
            self.headers["Connection"] = "keep-alive"  # 1.1 implies it, 1.0 must be told

    def send_headers(self) -> None:
        super().send_headers()
        self._head_only = self.environ["REQUEST_METHOD"] == "HEAD"

    def _write(self, data: bytes) -> None:
        if not self._head_only:
            super()._write(data)

    def finish_response(self) -> None:
        super().finish_response()
        self.completed = True

    def close(self) -> None:
        declared = self.headers.get("Content-Length") if self.headers else None
        if declared is not None and not self._head_only and declared.strip() != str(self.bytes_sent):
            log.warning("%s: the app declared Content-Length %s and sent %d bytes; closing the connection",
                        self.request_handler.requestline, declared, self.bytes_sent)
            self.request_handler.close_connection = True
        if self._head_only:
            self.bytes_sent = 0  # for the access log: no body left the server
        super().close()

    def log_exception(self, exc_info: Any) -> None:
        log.error("%s: the WSGI app failed", self.request_handler.requestline, exc_info=exc_info)


class WSGIRequestHandler(HTTPHandlerBase, simple_server.WSGIRequestHandler):
    """wsgiref's WSGIRequestHandler serving requests one after another on a kept-alive connection."""

    # Buffered, so that the status line, the headers and the first body chunk leave in one
    # segment (wsgiref writes each of them separately); flushed after every response.
    wbufsize = -1

    # The loop of http.server (one request after another until close_connection), instead of
    # wsgiref's single request per connection.
    handle = BaseHTTPRequestHandler.handle

    def handle_one_request(self) -> None:
        try:
            if self.read_request():
                self.respond()
            self.wfile.flush()
        except TimeoutError as exc:
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        """Send "100 Continue" at once: the client waits for it before sending the body."""
        answer = super().handle_expect_100()
        self.wfile.flush()
        return answer

    def read_request(self) -> bool:
        """Read and parse one request head; False when there is nothing to answer."""
        self.raw_requestline = self.rfile.readline(_MAX_REQUEST_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return False
        if len(self.raw_requestline) > _MAX_REQUEST_LINE:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        return self.parse_request()

    def respond(self) -> None:
        """Run the app for the parsed request, then skip what it left of the body."""
        length = self.body_length()
        if length is None:
            return
        body = RequestBody(self.rfile, length)
        handler = ServerHandler(body, cast("IO[bytes]", self.wfile), self.get_stderr(), self.get_environ(),
                                multithread=isinstance(self.server, ThreadingMixIn), multiprocess=True)
        handler.request_handler = self
        handler.request_body = body
        app = cast(WSGIServer, self.server).get_app()
        if app is None:
            raise RuntimeError("the WSGI server has no application: call set_app() first")
        handler.run(app)
        if not handler.completed:
            self.close_connection = True
        self.discard(body)

    def body_length(self) -> int | None:
        """The request body's length; None after answering a request whose body is not delimited."""
        if "Transfer-Encoding" in self.headers:
            self.send_error(HTTPStatus.LENGTH_REQUIRED, "Chunked request bodies are not supported")
            return None
        values = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not values:
            return 0
        value = values.pop() if len(values) == 1 else ""
        if not (value.isascii() and value.isdigit()):
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad Content-Length")
            return None
        return int(value)

    def discard(self, body: RequestBody) -> None:
        """Skip the body the app did not read, or give up the connection if it is too long."""
        if self.close_connection or body.remaining > MAX_DISCARD:
            self.close_connection = True
            return
        body.read()


def configure(app: str | WSGIApplication = "workers.wsgi:hello") -> Service:
    """Called in each worker: load *app* and return the service that runs it."""
    application = load_object(app) if isinstance(app, str) else app
    if not callable(application):
        raise AppLoadError(f"workers.wsgi: option app={app!r} is a {type(application).__name__}, "
                           f"not a WSGI callable")
    return Service(StreamHandler=WSGIRequestHandler, server_class=wsgi_server_class(application))


# Used as they are when no service option is given: the hello app.
StreamHandler = WSGIRequestHandler
server_class = wsgi_server_class(hello)
