"""Any WSGI application over HTTP/1.1, on prefork's core and workers.http1's parser. Runs in: worker.

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

How requests are served (PEP 3333):

- ``WSGIServer`` is wsgiref's server rebuilt on ``prefork.servers.TCPServer``: its
  ``server_bind`` (which also runs on a socket adopted from the master) builds the base environ.
  ``wsgi.multiprocess`` is true, ``wsgi.multithread`` is true in thread mode.
- Requests are parsed by ``workers.http1`` (httptools): chunked request bodies (read whole before
  the app runs, in memory up to ``SPOOL_MEMORY`` then in a temporary file, and given a
  ``CONTENT_LENGTH``, since many frameworks read only that much; their trailers in
  ``environ["prefork.trailers"]``), ``Expect: 100-continue`` (the ``100 Continue`` is sent when the
  app first reads ``wsgi.input``, or before a chunked body is read), pipelining, the smuggling defences and the limits
  of the ``max_*`` settings. ``wsgi.input`` ends where the body does, so ``read()`` never blocks
  on the next request; what the app leaves unread is skipped (up to ``MAX_DISCARD`` bytes, else
  the connection is closed).
- HTTP/1.1 keep-alive: a response without ``Content-Length`` (a single-string body gets one
  computed) is sent chunked to an HTTP/1.1 client, and ends the connection for an HTTP/1.0 one.
  HEAD, 1xx, 204 and 304 responses never carry a body, whatever the app returns. A body shorter
  than its declared length, an app that fails after sending its headers, and ``Connection:
  close`` from the client end the connection. Every response has a ``Date``; no ``Server`` header
  is added. The app's own headers list is never changed.
- ``wsgi.file_wrapper`` sends a real file with ``sendfile(2)`` (not on TLS connections).
- TLS connections (``ssl.SSLSocket``) get ``wsgi.url_scheme`` ``https`` and ``HTTPS=on``. Behind a
  proxy listed in ``forwarded_allow_ips``, ``REMOTE_ADDR``, ``wsgi.url_scheme`` and ``HTTP_HOST``
  follow its ``Forwarded`` or X-Forwarded-* headers (workers.forwarded).
- Header names with an underscore are not passed to the app (``X_User`` and ``X-User`` would both
  become ``HTTP_X_USER``: a client could spoof what a proxy sets).
- An exception in the app gives a 500 (if no header was sent yet), its traceback is logged on
  ``prefork.workers.wsgi`` at ERROR and the worker goes on. Requests are logged on
  ``prefork.access.http``, as by ``workers.http``.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import tempfile
from http import HTTPStatus
from typing import Any, Iterable, Iterator
from urllib.parse import unquote_to_bytes
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import httptools

from prefork.errors import AppLoadError
from prefork.loader import load_object
from prefork.mixins import ThreadingMixIn
from workers.forwarded import forwarded
from workers.http import HTTPHandlerBase, HTTPServer, Service
from workers.http1 import MAX_DISCARD, RECV_SIZE, BadRequest, Connection, Limits, Request, body_allowed, \
    is_trusted, limits_from, response_head

__all__ = ["DEFAULT_BIND", "MAX_DISCARD", "hello", "RequestBody", "FileWrapper", "WSGIServer", "Response",
           "WSGIRequestHandler", "wsgi_server_class", "StreamHandler", "server_class", "configure"]

DEFAULT_BIND = ["tcp://127.0.0.1:8000"]

# Bytes of a file sent per sendfile(2) call or read per chunk of a file_wrapper without one.
FILE_BLOCK = 1024 * 1024
# Headers the server sets itself: the app's are dropped (Connection: close is still honoured).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"})
_ERROR_BODY = b"Internal Server Error\n"
# A chunked request body is kept in memory up to this size, then in a temporary file.
SPOOL_MEMORY = 1024 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

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
    base_environ: dict[str, Any]

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
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.multithread": isinstance(self, ThreadingMixIn),
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.errors": sys.stderr,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
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
    """``wsgi.input``: the request body, never read past its end; "100 Continue" on the first read."""

    def __init__(self, http: Connection, response: Response) -> None:
        self._http = http
        self._response = response
        self._buffer = b""

    def read(self, size: int | None = -1) -> bytes:
        self._response.continue_once()
        if size is None or size < 0:
            data, self._buffer = self._buffer + self._http.read_body(-1), b""
            return data
        if len(self._buffer) < size:
            self._buffer += self._http.read_body(size - len(self._buffer))
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        self._response.continue_once()
        limit = sys.maxsize if size is None or size < 0 else size
        while b"\n" not in self._buffer and len(self._buffer) < limit:
            more = self._http.read_some(65536)
            if not more:
                break
            self._buffer += more
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        end = min(end, limit)
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line

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

    def close(self) -> None:
        """Nothing to release: what is left of the body is skipped after the response."""


class FileWrapper:
    """``wsgi.file_wrapper``: a file the server sends with sendfile(2) where it can."""

    def __init__(self, filelike: Any, blksize: int = FILE_BLOCK) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.filelike.read(self.blksize), b"")

    def fileno(self) -> int | None:
        """The file's descriptor if it is a regular file at a known offset, else None."""
        try:
            fd = self.filelike.fileno()
            self.filelike.tell()
        except (AttributeError, OSError, ValueError):
            return None
        return fd if isinstance(fd, int) else None


class Response:
    """One WSGI response: ``start_response``, ``write``, framing and the end of the body."""

    def __init__(self, handler: WSGIRequestHandler, request: Request) -> None:
        self.handler = handler
        self.request = request
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.length: int | None = None  # the Content-Length sent
        self.chunked = False
        self.with_body = True
        self.sent = 0
        self.close = False  # the connection ends after this response
        self._continued = not request.expect_continue

    def continue_once(self) -> None:
        """Send "100 Continue" before the body is read, if the client waits for it."""
        if not self._continued:
            self._continued = True
            if not self.head_sent:
                self.handler.wfile.write(_CONTINUE)
                self.handler.wfile.flush()

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if not (isinstance(status, str) and len(status) >= 4 and status[:3].isdigit() and status[3] == " "):
            raise AssertionError(f"bad WSGI status {status!r}")
        self.status = status
        self.headers = [(name, value) for name, value in headers]  # a copy: the app's list stays as it is
        return self.write

    def write(self, data: bytes) -> None:
        if not self.head_sent:
            self.send_head()
        self._send(data)

    def send_head(self, length: int | None = None) -> None:
        """Decide the framing and send the status line and headers."""
        if self.status is None:
            raise AssertionError("the app returned before calling start_response")
        code = int(self.status[:3])
        self.with_body = body_allowed(code, self.request.method)
        extra: list[tuple[str, str]] = []
        kept = []
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                self.length = int(value.strip()) if value.strip().isdigit() else None
            if lower in _HOP_BY_HOP:
                self.close = self.close or (lower == "connection" and "close" in value.lower())
                continue
            kept.append((name, value))
        if self.length is None and length is not None and code not in (204, 304) and code >= 200:
            self.length = length
            extra.append(("Content-Length", str(length)))
        self._frame(code, extra)
        head = response_head(self.status, kept, extra)
        self.head_sent = True
        self.handler.wfile.write(head)
        self.handler.final_status(code)

    def _frame(self, code: int, extra: list[tuple[str, str]]) -> None:
        handler, request = self.handler, self.request
        if self.length is None and self.with_body:
            if request.version == "HTTP/1.1":
                self.chunked = True
                extra.append(("Transfer-Encoding", "chunked"))
            else:
                self.close = True  # the body ends where the connection does
        if handler.http.unread_body_is_large():
            self.close = True  # too much unread body to skip afterwards: say so now
        if self.close or handler.close_connection:
            handler.close_connection = True
            extra.append(("Connection", "close"))
        elif request.version == "HTTP/1.0" and code >= 200:
            extra.append(("Connection", "keep-alive"))  # 1.1 implies it, 1.0 must be told

    def _send(self, data: bytes) -> None:
        if not data or not self.with_body:
            return
        if self.length is not None and self.sent + len(data) > self.length:
            data = data[:self.length - self.sent]  # never past the declared length
            self.handler.close_connection = True
        self.sent += len(data)
        if self.chunked:
            self.handler.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.handler.wfile.write(data)

    def send_file(self, wrapper: FileWrapper, fd: int) -> None:
        """The body of *wrapper* with sendfile(2): its length from the file unless declared."""
        offset = wrapper.filelike.tell()
        size = os.fstat(fd).st_size - offset
        count = size if self.length is None else min(size, self.length)
        if not self.head_sent:
            self.send_head(length=count)
        if not self.with_body:
            return
        if self.chunked:  # only when the app declared nothing and the size is known: never here
            raise AssertionError("send_file with chunked framing")
        self.handler.wfile.flush()
        sent = self.handler.connection.sendfile(wrapper.filelike, offset, count)
        self.sent += sent

    def finish(self) -> None:
        """End the body: the last chunk, or a check that the declared length was sent."""
        if not self.head_sent:
            self.send_head(length=0)
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")
        elif self.length is not None and self.with_body and self.sent != self.length:
            log.warning("%s: the app declared Content-Length %d and sent %d bytes; closing the connection",
                        self.request.request_line, self.length, self.sent)
            self.handler.close_connection = True


class WSGIRequestHandler(HTTPHandlerBase):
    """Runs the server's WSGI app for each request of a kept-alive connection."""

    # Buffered, so that the status line, the headers and the first body chunk leave in one
    # segment; flushed after every response.
    wbufsize = -1
    # What the access log reports of the current response.
    _status_code: int | str = "-"

    def respond(self, current: Request) -> None:
        """Run the app for *current*; a failure before any header gives a 500."""
        response = Response(self, current)
        environ = self.environ_for(current, response)
        app = self.server.get_app()  # type: ignore[attr-defined]
        if app is None:
            raise RuntimeError("the WSGI server has no application: call set_app() first")
        try:
            if current.chunked:
                _dechunk(environ, self.http, response)
            self.run_app(app, environ, response)
        except BadRequest:
            raise  # the body was bad: answered 400 and closed by the caller if nothing was sent
        except Exception:
            log.exception("%s: the WSGI app failed", current.request_line)
            self.fail(response)
        finally:
            if current.chunked:
                environ["wsgi.input"].close()
        self.log_request(self._status_code, response.sent)

    def run_app(self, app: WSGIApplication, environ: dict[str, Any], response: Response) -> None:
        result = app(environ, response.start_response)
        try:
            if isinstance(result, FileWrapper) and self.can_sendfile() and (fd := result.fileno()) is not None:
                response.send_file(result, fd)
            elif isinstance(result, (list, tuple)) and len(result) == 1 and not response.head_sent:
                response.send_head(length=len(result[0]))
                response.write(result[0])
            else:
                for data in result:
                    response.write(data)
            response.finish()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def fail(self, response: Response) -> None:
        """After an app's exception: a 500 if nothing was sent, else the connection ends."""
        if response.head_sent:
            self.close_connection = True
            return
        response.status, response.length = None, None
        response.start_response("500 Internal Server Error", [("Content-Type", "text/plain"),
                                                              ("Content-Length", str(len(_ERROR_BODY)))])
        response.send_head()
        response.write(_ERROR_BODY)

    def can_sendfile(self) -> bool:
        return not isinstance(self.connection, ssl.SSLSocket)

    def final_status(self, code: int) -> None:
        self._status_code = code
        self._final_response = True

    def environ_for(self, current: Request, response: Response) -> dict[str, Any]:
        """The environ of *current* (PEP 3333), behind a trusted proxy as its headers say."""
        environ: dict[str, Any] = self.server.base_environ.copy()  # type: ignore[attr-defined]
        path, query, host = _split_target(current.url)
        environ["REQUEST_METHOD"] = current.method
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        environ["SERVER_PROTOCOL"] = current.version
        environ["REMOTE_ADDR"] = self.client_address[0]
        environ["REMOTE_PORT"] = str(self.client_address[1])
        environ["wsgi.input"] = RequestBody(self.http, response)
        environ["prefork.trailers"] = current.trailers
        _add_headers(environ, current.headers)
        if host is not None:
            environ["HTTP_HOST"] = host  # absolute-form: the target's authority wins (RFC 9112 3.2.2)
        secure = isinstance(self.connection, ssl.SSLSocket)
        environ["wsgi.url_scheme"] = "https" if secure else "http"
        if secure:
            environ["HTTPS"] = "on"
        if is_trusted(self.client_address[0], self.limits.forwarded_allow_ips):
            _apply_forwarded(environ, current.headers)
        return environ


def _dechunk(environ: dict[str, Any], http: Connection, response: Response) -> None:
    """Read a chunked body whole before the app runs, and give it a CONTENT_LENGTH.

    Many frameworks (Django among them) read CONTENT_LENGTH bytes of ``wsgi.input`` and ignore
    ``wsgi.input_terminated``: a chunked upload would reach them empty. So, as waitress does,
    the body is spooled (in memory up to SPOOL_MEMORY, then in a temporary file), within the
    ``max_body_size`` setting.
    """
    response.continue_once()
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
    while data := http.read_some(RECV_SIZE):
        spool.write(data)
    environ["CONTENT_LENGTH"] = str(spool.tell())
    spool.seek(0)
    environ["wsgi.input"] = spool


def _split_target(url: bytes) -> tuple[str, str, str | None]:
    """PATH_INFO (decoded, latin-1 as PEP 3333 says), QUERY_STRING and, for an absolute-form
    target, its host."""
    host = None
    url = url.partition(b"#")[0]  # a fragment is the client's own business (RFC 9112 3.2)
    if not url.startswith(b"/"):
        if url == b"*":
            return "*", "", None
        parsed = httptools.parse_url(url)
        host = parsed.host.decode("latin-1") if parsed.host else None
        if host and parsed.port:
            host = f"{host}:{parsed.port}"
        url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
    path, _, query = url.partition(b"?")
    return unquote_to_bytes(path).decode("latin-1"), query.decode("latin-1"), host


def _add_headers(environ: dict[str, Any], headers: Iterable[tuple[str, str]]) -> None:
    for name, value in headers:
        if "_" in name:
            continue  # see the module's docstring
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
            continue
        key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value


def _apply_forwarded(environ: dict[str, Any], headers: list[tuple[str, str]]) -> None:
    said = forwarded(headers)
    if said.client:
        environ["REMOTE_ADDR"] = said.client
    if said.scheme:
        environ["wsgi.url_scheme"] = said.scheme
        if said.scheme == "https":
            environ["HTTPS"] = "on"
        else:
            environ.pop("HTTPS", None)
    if said.host:
        environ["HTTP_HOST"] = said.host


def configure(app: str | WSGIApplication = "workers.wsgi:hello", settings: Any = None) -> Service:
    """Called in each worker: load *app* and return the service that runs it within the HTTP
    limits of *settings* (prefork's settings; None: the defaults)."""
    application = load_object(app) if isinstance(app, str) else app
    if not callable(application):
        raise AppLoadError(f"workers.wsgi: option app={app!r} is a {type(application).__name__}, "
                           f"not a WSGI callable")
    return Service(StreamHandler=wsgi_handler(limits_from(settings)), server_class=wsgi_server_class(application))


def wsgi_handler(limits: Limits) -> type[WSGIRequestHandler]:
    """A WSGIRequestHandler class that applies *limits*."""
    return type("WSGIRequestHandler", (WSGIRequestHandler,), {"limits": limits})


# Used as they are when no service option is given: the hello app.
StreamHandler = WSGIRequestHandler
server_class = wsgi_server_class(hello)
