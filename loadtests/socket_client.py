"""A small socket client that reports to locust: raw TCP, UDP and Unix echo requests. Runs in: locust.

Locust measures what its clients report. HTTP users get that from ``HttpUser``; any other
protocol follows locust's documented custom-client pattern: time the call and fire
``environment.events.request`` with its type, name, response time (ms), response length and,
on failure, the exception. ``EchoClient`` does that for the echo protocol of ``workers.echo``
(a line goes out, the same line comes back):

- ``short(line)``: connect, send the line, read the echo, close (one connection per request);
- ``persistent(line)``: the same on a connection kept open across requests, reopened after
  ``requests_per_connection`` requests (a synchronous worker serves one connection at a time,
  so connections that never close would starve every client beyond the number of workers);
- ``datagram(payload)``: one datagram out, the same datagram back (UDP, or a Unix datagram
  socket bound to a path of its own).

Addresses are prefork's bind specs: ``tcp://HOST:PORT``, ``udp://HOST:PORT``, ``unix:PATH``,
``unix-dgram:PATH``. Every socket has a timeout, so a request can fail but never hang.

Under locust, ``socket`` is gevent's (locust monkey-patches at import), so a blocking call
yields to the other users; outside locust the client works the same with plain sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import tempfile
import time
from typing import Any, Callable

from loadtests.load import REQUESTS_PER_CONNECTION, SOCKET_TIMEOUT, Conversation

__all__ = ["Address", "parse_address", "EchoClient", "EchoMismatch", "SOCKET_TIMEOUT"]

# The most a reply may be: workers.echo answers a line of up to 64 KiB in one piece.
MAX_REPLY = 65536


class EchoMismatch(Exception):
    """The server answered, but not with what was sent."""


@dataclasses.dataclass(frozen=True)
class Address:
    """A parsed bind spec: the socket family and type to use, and the address to reach."""

    kind: str  # tcp, udp, unix, unix-dgram
    family: int
    type: int
    target: Any

    @property
    def is_stream(self) -> bool:
        return self.type == socket.SOCK_STREAM


def parse_address(spec: str) -> Address:
    """``tcp://HOST:PORT``, ``udp://HOST:PORT``, ``unix:PATH`` or ``unix-dgram:PATH``."""
    for prefix, kind, sock_type in (("tcp://", "tcp", socket.SOCK_STREAM), ("udp://", "udp", socket.SOCK_DGRAM)):
        if spec.startswith(prefix):
            host, _, port = spec[len(prefix):].rstrip("/").rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return Address(kind, family, sock_type, (host, int(port)))
    for prefix, kind, sock_type in (("unix-dgram:", "unix-dgram", socket.SOCK_DGRAM),
                                    ("unix:", "unix", socket.SOCK_STREAM)):
        if spec.startswith(prefix):
            return Address(kind, socket.AF_UNIX, sock_type, spec[len(prefix):])
    raise ValueError(f"not an address: {spec!r} (tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, unix-dgram:PATH)")


class EchoClient:
    """One user's connection state; every request is timed and reported through *fire*.

    *fire* is ``environment.events.request.fire`` under locust (any callable taking the same
    keyword arguments elsewhere).
    """

    def __init__(self, spec: str, fire: Callable[..., Any], timeout: float = SOCKET_TIMEOUT,
                 requests_per_connection: int = REQUESTS_PER_CONNECTION) -> None:
        self.address = parse_address(spec)
        self.fire = fire
        self.timeout = timeout
        self.requests_per_connection = requests_per_connection
        self._stream: Conversation | None = None
        self._stream_used = 0
        self._dgram: socket.socket | None = None
        self._dgram_path: str | None = None
        self._sequence = itertools.count()

    # -- the three kinds of request ---------------------------------------------------------------

    def short(self, line: bytes, name: str = "short") -> None:
        """Connect, send *line* (newline added), read the echo, close."""
        self._timed(f"{self.address.kind}", name, lambda: self._short(line))

    def persistent(self, line: bytes, name: str = "persistent") -> None:
        """Send *line* on the kept-open connection and read its echo."""
        self._timed(f"{self.address.kind}", name, lambda: self._persistent(line))

    def datagram(self, payload: bytes, name: str = "datagram") -> None:
        """Send one datagram and wait for the same one back."""
        self._timed(f"{self.address.kind}", name, lambda: self._datagram(payload))

    def close(self) -> None:
        self._close_stream()
        if self._dgram is not None:
            self._dgram.close()
            self._dgram = None
        if self._dgram_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._dgram_path)
            os.rmdir(os.path.dirname(self._dgram_path))
            self._dgram_path = None

    # -- reporting --------------------------------------------------------------------------------

    def _timed(self, request_type: str, name: str, call: Callable[[], int]) -> None:
        start = time.perf_counter()
        length, exception = 0, None
        try:
            length = call()
        except (OSError, EchoMismatch) as exc:  # timeouts and resets are OSErrors: the request failed
            exception = exc
            self._close_stream()  # a failed exchange leaves the connection in an unknown state
        self.fire(request_type=request_type, name=name, response_time=(time.perf_counter() - start) * 1000,
                  response_length=length, exception=exception, context={})

    # -- stream -----------------------------------------------------------------------------------

    def _connect(self) -> Conversation:
        return Conversation(self.address.target, self.address.family, self.timeout)

    def _short(self, line: bytes) -> int:
        with contextlib.closing(self._connect()) as conversation:
            return _checked(conversation.reply(line + b"\n"), line)

    def _persistent(self, line: bytes) -> int:
        if self._stream is None:
            self._stream, self._stream_used = self._connect(), 0
        length = _checked(self._stream.reply(line + b"\n"), line)
        self._stream_used += 1
        if self._stream_used >= self.requests_per_connection:
            self._close_stream()
        return length

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # -- datagram ---------------------------------------------------------------------------------

    def _datagram_socket(self) -> socket.socket:
        if self._dgram is None:
            sock = socket.socket(self.address.family, socket.SOCK_DGRAM)
            sock.settimeout(self.timeout)
            if self.address.family == socket.AF_UNIX:
                # A Unix datagram needs a bound sender to be answered: a path of our own.
                self._dgram_path = os.path.join(tempfile.mkdtemp(prefix="lc-", dir="/tmp"), "c")
                sock.bind(self._dgram_path)
            self._dgram = sock
        return self._dgram

    def _datagram(self, payload: bytes) -> int:
        sock = self._datagram_socket()
        # A sequence number makes each request unique, so a late reply to an earlier request
        # that timed out is recognised and skipped instead of being taken for this one's.
        expected = b"%d " % next(self._sequence) + payload
        sock.sendto(expected, self.address.target)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = sock.recv(MAX_REPLY)
            if reply == expected:
                return len(reply)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no matching reply within {self.timeout} s")


def _checked(reply: bytes, sent: bytes) -> int:
    """The reply's length; EchoMismatch unless it is *sent* and its newline."""
    if reply != sent + b"\n":
        raise EchoMismatch(f"sent {sent[:80]!r}, got {reply[:80]!r}")
    return len(reply)
