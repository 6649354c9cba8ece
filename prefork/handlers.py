"""Request handler classes of the compatible core. Runs in: worker.

A handler object lives for one request: the constructor calls ``setup()``, ``handle()`` and,
even when ``handle()`` raises, ``finish()``. Names, attributes and defaults are those of the
standard library's ``socketserver``; this module never imports it. (A plain server that uses
the core without prefork runs its handlers in its own process.)
"""

from __future__ import annotations

import io
import socket
from typing import Any

__all__ = ["BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler"]


class BaseRequestHandler:
    """Base class for request handler classes.

    One instance is created per request. The constructor sets ``request``,
    ``client_address`` and ``server``, then calls ``setup()``, ``handle()`` and ``finish()``.
    Override ``handle()`` to serve a request; ``setup()`` and ``finish()`` to prepare and clean up.
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        pass

    def handle(self) -> None:
        pass

    def finish(self) -> None:
        pass


class _SendallWriter(io.BufferedIOBase):
    """An unbuffered write-only file on a socket: every write() is one sendall().

    ``makefile('wb', 0)`` is not used because a raw SocketIO may write only part of the data;
    callers such as wsgiref warn about partial writes.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        if type(data) is bytes:
            return len(data)  # the common case: no memoryview to build and release
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


# The fast path builds what makefile("rb") builds, and must keep its count of open files on
# the socket (a private slot of CPython's socket class): used only where that slot exists.
_FAST_READER = "_io_refs" in getattr(socket.socket, "__slots__", ())


def _buffered_reader(conn: socket.socket) -> io.BufferedReader:
    """What conn.makefile("rb") returns, without makefile's mode parsing on every request."""
    # makefile() counts its files so that conn.close() keeps the descriptor open until the
    # last file is closed too; SocketIO.close() takes the count back down.
    conn._io_refs += 1  # type: ignore[attr-defined]
    return io.BufferedReader(socket.SocketIO(conn, "r"), io.DEFAULT_BUFFER_SIZE)


class StreamRequestHandler(BaseRequestHandler):
    """A handler for stream sockets that offers ``rfile`` and ``wfile`` file objects.

    Class attributes: ``rbufsize`` (read buffer, -1 for the default), ``wbufsize`` (0 for an
    unbuffered wfile, which is the default), ``timeout`` (applied to the connection when not
    None) and ``disable_nagle_algorithm`` (sets TCP_NODELAY when true).
    """

    rbufsize = -1
    wbufsize = 0
    timeout: float | None = None
    disable_nagle_algorithm = False

    def setup(self) -> None:
        self.connection = conn = self.request
        if self.timeout is not None:
            conn.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if _FAST_READER and self.rbufsize == -1 and type(conn) is socket.socket:
            self.rfile = _buffered_reader(conn)
        else:
            self.rfile = conn.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile: Any = _SendallWriter(conn)
        else:
            self.wfile = conn.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                # The peer is gone; what was buffered cannot be delivered, and the request is
                # over either way. Swallowed so that finish() still closes both files.
                pass
        self.wfile.close()
        self.rfile.close()


class DatagramRequestHandler(BaseRequestHandler):
    """A handler for datagram sockets: ``rfile`` holds the packet, ``wfile`` the reply.

    ``self.request`` is ``(data, socket)``. What ``handle()`` writes to ``wfile`` is sent back
    to the client as one datagram by ``finish()``.
    """

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        self.socket.sendto(self.wfile.getvalue(), self.client_address)
