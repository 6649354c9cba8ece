"""HTTP/1.1 on one client connection, parsed by httptools (llhttp): requests in, heads out. Runs in: worker.

Shared by ``workers.http`` and ``workers.wsgi``. Why httptools and not h11: per keep-alive
request (a browser-like GET, 7 headers) httptools costs about 20,000 instructions, h11 about
390,000 for the same cycle (236,000 to parse alone), under callgrind; and llhttp (Node.js's
parser, fuzzed for years) is strict by default: it refuses every smuggling vector listed below.

Rules:

1. A request's head is complete before any handler runs; its body is read from the socket only
   as the handler asks for it (``read_body``), so an upload streams. What the handler leaves
   unread is skipped before the next request, up to ``MAX_DISCARD`` bytes (else the connection
   closes).
2. Pipelined requests are answered one after another, in order: bytes beyond the current
   request stay parsed but unanswered until it is done. A connection reads at most
   ``RECV_SIZE`` bytes at a time, and only when the current request needs more.
3. Refused with 400 and the connection closed (``BadRequest``): anything llhttp refuses
   (Content-Length with Transfer-Encoding, duplicate or malformed Content-Length, bad chunk
   sizes, obsolete line folding, whitespace before a colon, invalid characters in the method,
   target, header names or values, bare CR or LF line ends), an HTTP/1.1 request without one
   Host header, HTTP/0.9; 501 for a transfer coding other than chunked, 505 for HTTP/2+.
4. Limits (the settings ``max_request_line``, ``max_header_count``, ``max_header_bytes``,
   ``max_body_size``) are answered 414, 431, 431 and 413, the connection closed.
5. Nothing here writes a response body: ``response_head`` serializes a head; the services
   decide bodies and framing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import socket
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Iterable

import httptools

from prefork.allowlist import AllowList
from prefork.bindspec import parse_networks

__all__ = ["Limits", "Request", "BadRequest", "Connection", "response_head", "http_date", "body_allowed", "is_trusted",
           "MAX_DISCARD",
           "RECV_SIZE", "limits_from"]

# Unread request body skipped to keep a connection alive; beyond this, closing is cheaper than
# reading (and the client is likely still uploading).
MAX_DISCARD = 64 * 1024
# Bytes read from the socket at a time: a whole head of any usual request, or a good piece of a body.
RECV_SIZE = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may be (the settings of the same names; 0 body means no limit)."""

    max_request_line: int = 8190
    max_header_count: int = 100
    max_header_bytes: int = 64 * 1024
    max_body_size: int = 0
    # Peers whose X-Forwarded-* and Forwarded headers are believed (workers.forwarded).
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1/32", "::1/128")


def limits_from(settings: Any) -> Limits:
    """The Limits of prefork settings (or of anything with the same attributes; None: defaults)."""
    if settings is None:
        return Limits()
    return Limits(settings.max_request_line, settings.max_header_count, settings.max_header_bytes,
                  settings.max_body_size, tuple(settings.forwarded_allow_ips))


class BadRequest(Exception):
    """A request that cannot be answered but with *status*; the connection then closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclasses.dataclass(eq=False)
class Request:
    """One request as parsed: its head, then its body as it arrives."""

    url: bytes = b""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    method: str = ""
    version: str = "HTTP/1.1"
    keep_alive: bool = True
    chunked: bool = False
    content_length: int | None = None
    expect_continue: bool = False
    upgrade: bool = False
    head_done: bool = False
    complete: bool = False
    error: BadRequest | None = None
    head_bytes: int = 0  # of the header fields parsed
    fed_bytes: int = 0  # received while the head was incomplete
    body: collections.deque[bytes] = dataclasses.field(default_factory=collections.deque)
    body_received: int = 0
    body_read: int = 0
    trailers: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def target(self) -> str:
        return self.url.decode("latin-1")

    def header(self, name: str) -> str | None:
        """The first value of header *name* (any case), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.target} {self.version}"


class Connection:
    """The requests of one client socket, in order (httptools' callbacks build them)."""

    def __init__(self, sock: socket.socket, limits: Limits | None = None) -> None:
        self.sock = sock
        self.limits = limits or Limits()
        self._parser = httptools.HttpRequestParser(self)
        self._pending: collections.deque[Request] = collections.deque()
        self._incoming: Request | None = None
        self._eof = False
        self._broken: BadRequest | None = None  # the parser refused the stream: nothing after it is parsed
        self.current: Request | None = None

    # -- for the handler ------------------------------------------------------------------------

    def next_request(self) -> Request | None:
        """The next request with its head complete; None when the client closed between requests.

        Raises BadRequest for a request refused by rule 3 or 4, TimeoutError for a silent client.
        """
        while not self._pending or not self._pending[0].head_done:
            if self._pending and self._pending[0].error:
                break
            if self._broken is not None and not self._pending:
                raise self._broken
            if self._eof:
                if self._pending and (self._pending[0].url or self._pending[0].fed_bytes):
                    raise BadRequest(HTTPStatus.BAD_REQUEST, "the client closed mid-head")
                return None
            self._receive()
        request = self._pending[0]
        if request.error is not None:
            raise request.error
        self.current = request
        return request

    def read_body(self, size: int = -1) -> bytes:
        """Up to *size* bytes of the current request's body (all of it if negative); b"" at its end."""
        request = self.current
        if request is None:
            return b""
        while not request.complete and (size < 0 or request.body_received - request.body_read < size):
            if request.error is not None:
                raise request.error
            if self._eof:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "the client closed mid-body")
            self._receive()
        if request.error is not None and not request.body:
            raise request.error
        return self._take(request, size)

    def read_some(self, size: int) -> bytes:
        """Up to *size* bytes of the current body, as soon as any are there (b"" at its end)."""
        request = self.current
        if request is None:
            return b""
        while not request.body and not request.complete:
            if request.error is not None:
                raise request.error
            if self._eof:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "the client closed mid-body")
            self._receive()
        return self._take(request, size)

    def finish_request(self, keep_alive: bool = True) -> bool:
        """Done with the current request: skip its unread body unless the connection is to close
        (*keep_alive* false). False if the connection must close."""
        request, self.current = self.current, None
        if request is None:
            return False
        self._pending.popleft()
        if request.upgrade or not request.keep_alive or not keep_alive:
            return False
        try:
            while not request.complete:
                if request.body_read > MAX_DISCARD or request.error or self._eof:
                    return False
                self._take(request, -1)
                self._receive()
        except (BadRequest, OSError):
            return False
        return True

    def unread_body_is_large(self) -> bool:
        """Whether skipping the rest of the current body would exceed MAX_DISCARD (so: close)."""
        request = self.current
        if request is None or request.complete:
            return False
        declared = request.content_length
        return request.chunked or declared is None or declared - request.body_read > MAX_DISCARD

    # -- reading --------------------------------------------------------------------------------

    def _receive(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            self._eof = True
            return
        self.feed(data)

    def feed(self, data: bytes) -> None:
        """Parse *data* (what the socket gave); errors are kept for the request they belong to."""
        if self._broken is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._incoming is not None:  # served, then the connection closes: no upgrade here
                self._incoming.upgrade = True
                self._incoming.keep_alive = False
            self._broken = BadRequest(HTTPStatus.BAD_REQUEST, "nothing is read after an upgrade request")
        except httptools.HttpParserCallbackError as exc:
            self._refuse(exc.__context__ if isinstance(exc.__context__, BadRequest)
                         else BadRequest(HTTPStatus.BAD_REQUEST, str(exc)))
        except httptools.HttpParserError as exc:
            self._refuse(BadRequest(HTTPStatus.BAD_REQUEST, str(exc) or type(exc).__name__))
        else:
            self._check_head_size(len(data))

    def _refuse(self, error: BadRequest) -> None:
        request = self._incoming
        if request is None or request.complete:
            request = Request()
            self._pending.append(request)
        request.error = request.error or error
        request.keep_alive = False
        self._broken = error

    def _check_head_size(self, fed: int) -> None:
        request = self._incoming
        if request is None or request.head_done:
            return
        request.fed_bytes += fed  # bounds what llhttp buffers of a header still incomplete
        if request.fed_bytes > self.limits.max_request_line + self.limits.max_header_bytes + 64:
            self._refuse(BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"))

    @staticmethod
    def _take(request: Request, size: int) -> bytes:
        if size < 0:
            data = b"".join(request.body)
            request.body.clear()
        else:
            data = _take_from(request.body, size)
        request.body_read += len(data)
        return data

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._incoming = Request()
        self._pending.append(self._incoming)

    def on_url(self, url: bytes) -> None:
        request = self._incoming
        assert request is not None
        request.url += url
        if len(request.url) > self.limits.max_request_line:
            raise BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._incoming
        assert request is not None
        if request.head_done:  # a trailer of a chunked body
            request.trailers.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))
            return
        # llhttp keeps the whitespace after a value; it is not part of it (RFC 9110 5.5).
        request.headers.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))
        request.head_bytes += len(name) + len(value) + 4
        if len(request.headers) > self.limits.max_header_count:
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header fields")
        if request.head_bytes > self.limits.max_header_bytes + len(request.url):
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")

    def on_headers_complete(self) -> None:
        request = self._incoming
        assert request is not None
        parser = self._parser
        request.method = parser.get_method().decode("ascii")
        request.version = "HTTP/" + parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        _check_head(request, self.limits)
        request.head_done = True

    def on_body(self, body: bytes) -> None:
        request = self._incoming
        assert request is not None
        request.body.append(body)
        request.body_received += len(body)
        limit = self.limits.max_body_size
        if limit and request.body_received > limit:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")

    def on_message_complete(self) -> None:
        request = self._incoming
        assert request is not None
        request.complete = True


def _take_from(chunks: collections.deque[bytes], size: int) -> bytes:
    """Up to *size* bytes from the front of *chunks*."""
    taken: list[bytes] = []
    while chunks and size > 0:
        chunk = chunks.popleft()
        if len(chunk) > size:
            chunks.appendleft(chunk[size:])
            chunk = chunk[:size]
        taken.append(chunk)
        size -= len(chunk)
    return b"".join(taken)


def _check_head(request: Request, limits: Limits) -> None:
    """What llhttp lets through and RFC 9112 refuses (rule 3), and the body limit (rule 4)."""
    if request.version == "HTTP/0.9" or not request.version.startswith("HTTP/1."):
        if request.version.startswith("HTTP/0"):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not served")
        raise BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"{request.version} is not served here")
    hosts = length = 0
    for name, value in request.headers:
        lower = name.lower()
        if lower == "host":
            hosts += 1
        elif lower == "transfer-encoding":
            if value.strip().lower() != "chunked" or request.chunked:
                raise BadRequest(HTTPStatus.NOT_IMPLEMENTED, f"transfer coding {value!r} is not supported")
            request.chunked = True
        elif lower == "content-length":
            length = int(value)  # llhttp accepts only one, and only digits
            request.content_length = length
        elif lower == "expect":
            if value.strip().lower() != "100-continue":
                raise BadRequest(HTTPStatus.EXPECTATION_FAILED, f"cannot meet Expect: {value}")
            request.expect_continue = request.version == "HTTP/1.1"
    if request.chunked and request.version == "HTTP/1.0":
        request.keep_alive = False  # its framing is faulty: answered, then closed (RFC 9112 6.1)
    if hosts > 1 or (hosts == 0 and request.version == "HTTP/1.1"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request needs exactly one Host header")
    if request.method == "CONNECT":
        raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, "CONNECT: this is not a proxy")
    if limits.max_body_size and length > limits.max_body_size:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")


# -- responses ------------------------------------------------------------------------------------

_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value for now (computed once a second)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def response_head(status: str, headers: Iterable[tuple[str, str]], extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """The status line and headers, with a Date header unless given; latin-1, as HTTP sends them."""
    lines = [f"HTTP/1.1 {status}\r\n".encode("latin-1")]
    dated = False
    for name, value in (*headers, *extra):
        if not dated and name.lower() == "date":
            dated = True
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if not dated:
        lines.append(b"Date: " + http_date() + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def body_allowed(status_code: int, method: str) -> bool:
    """Whether a response may carry a body: never for HEAD, 1xx, 204 and 304."""
    return method != "HEAD" and status_code >= 200 and status_code not in _NO_BODY_STATUSES


def is_trusted(peer: str, allowed: tuple[str, ...]) -> bool:
    """Whether *peer* (an IP address, or "" for a Unix socket) may speak for clients behind it.

    The same network test as ``?allow=`` and ``proxy_allow_ips`` (prefork.allowlist)."""
    if not peer:
        return True
    trusted = _allow_list(allowed)
    return trusted is None or trusted.admits((peer, 0))


@functools.lru_cache(maxsize=8)
def _allow_list(allowed: tuple[str, ...]) -> AllowList | None:
    """The networks of forwarded_allow_ips, parsed once per worker; None for ``*``: any peer."""
    return None if "*" in allowed else AllowList(parse_networks(allowed, "setting 'forwarded_allow_ips'"))
