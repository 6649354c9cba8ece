"""Newline echo over TCP, UDP and Unix sockets. Runs in: worker.

Usage::

    prefork run workers.echo --bind tcp://127.0.0.1:9000 --bind udp://127.0.0.1:9000 --workers 4
    printf 'hello\\n' | nc -q1 127.0.0.1 9000            # -> hello

    prefork.serve("workers.echo", bind=["tcp://127.0.0.1:9000", "unix:/run/echo.sock"])

Without ``--bind`` the service listens on ``DEFAULT_BIND`` (TCP and UDP on 127.0.0.1:9000).
It takes no service options.

What it does:

- Stream listeners (``tcp://``, ``unix:``): ``StreamHandler`` sends back each line as soon as
  its newline arrives, until the client closes; a last line without a newline is sent back too.
  A line longer than ``MAX_LINE`` (64 KiB) is sent back in ``MAX_LINE`` pieces as they arrive,
  so the reply is still byte for byte what was sent while a worker never holds more than one
  piece in memory. A connection idle for ``IDLE_TIMEOUT`` seconds (or the ``read_timeout``
  setting, if shorter) is closed, so a forgotten client cannot hold a synchronous worker for
  ever. (The master's ``timeout`` setting counts a whole connection as one request: leave it
  unset, or above the longest session you expect.)
- Datagram listeners (``udp://``, ``unix-dgram:``): ``DatagramHandler`` sends each datagram back
  unchanged, to the address it came from. An empty datagram gets an empty datagram back (a
  cheap liveness probe). A Unix datagram from an unbound socket has no return address and
  gets no reply. ``datagram_server_class`` reads datagrams of up to 64 KiB (socketserver's
  default reads 8 KiB and truncates larger ones).
- ``--mode asyncio`` (prefork.aio): ``AsyncStreamHandler`` and ``AsyncDatagramHandler`` do the
  same in the worker's event loop, where an idle connection costs a few KiB and no worker
  (close idle ones with the ``idle_timeout`` setting).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prefork.accounting import stricter_timeout
from prefork.aio import AsyncStreamRequestHandler
from prefork.handlers import DatagramRequestHandler, StreamRequestHandler
from prefork.servers import UDPServer

__all__ = ["DEFAULT_BIND", "MAX_LINE", "IDLE_TIMEOUT", "StreamHandler", "DatagramHandler",
           "EchoDatagramServer", "datagram_server_class", "AsyncStreamHandler", "AsyncDatagramHandler"]

DEFAULT_BIND = ["tcp://127.0.0.1:9000", "udp://127.0.0.1:9000"]

# The most a worker reads before answering: a line is sent back at its newline or after this
# many bytes, whichever comes first, so memory per connection is bounded whatever clients send.
MAX_LINE = 64 * 1024

# Seconds a connection may stay silent before it is closed. A synchronous worker serves one
# connection at a time, so an idle client must not be able to keep it for ever.
IDLE_TIMEOUT = 300.0

log = logging.getLogger("prefork.workers.echo")


class StreamHandler(StreamRequestHandler):
    """Echoes each line (or MAX_LINE piece of a longer one) until the client closes."""

    timeout: float | None = IDLE_TIMEOUT
    # A worker hands a connection to this handler once its first line is in (prefork.parking):
    # a client that stalls before its first newline never holds a worker.
    message_delimiter = b"\n"

    def setup(self) -> None:
        self.timeout = stricter_timeout(self.request, self.timeout)
        super().setup()

    def handle(self) -> None:
        try:
            self.echo_lines()
        except TimeoutError:
            log.info("closing %s: idle for %s s", self.client_address or "unix peer", self.timeout)
        except ConnectionError as exc:
            # The client reset or stopped reading: nothing left to answer, not a server error.
            log.debug("client %s went away: %s", self.client_address or "unix peer", exc)

    def echo_lines(self) -> None:
        while piece := self.rfile.readline(MAX_LINE):
            self.wfile.write(piece)


class DatagramHandler(DatagramRequestHandler):
    """Sends each datagram back unchanged (an empty one gets an empty reply)."""

    def handle(self) -> None:
        self.wfile.write(self.packet)

    def finish(self) -> None:
        if not self.client_address:
            # An unbound Unix datagram socket has no address to answer to.
            log.debug("datagram of %d bytes from an unbound peer: no reply possible", len(self.packet))
            return
        super().finish()


class EchoDatagramServer(UDPServer):
    """A UDP (or, adopting a Unix socket, Unix datagram) server that reads whole datagrams."""

    # The largest UDP payload is 65507 bytes; reading 64 KiB keeps every datagram whole.
    max_packet_size = 65536


# The server class for datagram listeners, as ``server_class`` is for stream listeners.
datagram_server_class = EchoDatagramServer


class AsyncStreamHandler(AsyncStreamRequestHandler):
    """asyncio mode: echoes each line (or MAX_LINE piece of a longer one) until the client closes."""

    async def handle(self) -> None:
        try:
            while piece := await read_piece(self.reader):
                self.writer.write(piece)
                await self.writer.drain()
        except ConnectionError as exc:
            log.debug("client %s went away: %s", self.client_address or "unix peer", exc)


async def read_piece(reader: asyncio.StreamReader) -> bytes:
    """The next line, or the next MAX_LINE bytes of a longer one; b"" at the end."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial  # the last line, without its newline (or b"")
    except asyncio.LimitOverrunError:
        return await reader.read(MAX_LINE)  # a piece of what the buffer holds


class AsyncDatagramHandler(asyncio.DatagramProtocol):
    """asyncio mode: sends each datagram back unchanged, in the loop (no task per datagram)."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not addr:
            log.debug("datagram of %d bytes from an unbound peer: no reply possible", len(data))
            return
        self.transport.sendto(data, addr)
