"""The server classes of the compatible core: BaseServer, TCP, UDP and Unix servers. Runs in: both.

Rules of this module:

1. Public names, signatures, class attributes, defaults and the order in which hooks are called
   are those of the standard library's ``socketserver`` (Python 3.11 to 3.13). Code written for
   the stdlib must not be able to tell the difference through any documented hook.
2. What is added never changes an existing meaning:
   - ``shutdown()`` wakes ``serve_forever()`` at once through a wake-up channel instead of
     waiting for the next ``poll_interval``;
   - a server can adopt a socket that is already bound (``adopt_socket`` / ``from_socket``) and
     the subclass's ``server_bind`` and ``server_activate`` bookkeeping still runs;
   - listeners are waited on so that many processes can share one (``EPOLLEXCLUSIVE`` on Linux)
     and a connection taken by another process is a silent non-event, not a blocked worker;
   - ``TCPServer.take_request()`` and ``dispatch_request()`` handle one request in two steps, so
     that a caller (a prefork worker) can hold a connection in between.
3. What a layer above needs of the core is the extension interface, public and typed:
   ``Poller``, ``LoopServer`` (a Protocol of what a loop outside the core needs of a server,
   implemented by ``TCPServer`` and its subclasses: ``prepare_listener``, ``serve_ready``,
   ``take_request``, ``dispatch_request``), ``adopt_socket``/``from_socket`` and
   ``is_listening``. Underscore names stay inside this module.
4. The request path is lean: one ``epoll_wait`` per turn on a registration made once per
   ``serve_forever`` call, no selector objects built per turn.

This module never imports the standard library's ``socketserver``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Protocol

from prefork.ratelimit import RateLimit

__all__ = ["BaseServer", "TCPServer", "UDPServer"]
# Poller, LoopServer, is_listening and RESOURCE_ERRNOS (the core's extension interface) are
# public but not in __all__, so that the drop-in facade keeps exactly the standard library's names.

log = logging.getLogger("prefork.server")

_RequestType = Any  # a connected socket for stream servers, (data, socket) for datagram servers
_AddressType = Any  # (host, port) tuples, (host, port, flowinfo, scope_id) or a Unix path

# Failures that mean the process (or the machine) is out of a resource. Retrying at once would
# spin at 100% CPU because the listener stays readable, so we log and back off briefly.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# How long to stop accepting after a resource failure: long enough that a busy loop cannot
# form, short enough that service resumes promptly once descriptors are released.
_RESOURCE_BACKOFF = 0.05

# At most one log line per this many seconds about resource failures (the rest are counted).
_RESOURCE_LOG_INTERVAL = 5.0

# How many requests one wake-up of the loop may take from a ready listener. While connections
# or datagrams keep arriving, each further accept()/recvfrom() replaces an epoll_wait() and a
# turn of the loop (the stdlib waits again after every request); when the queue is empty the
# extra attempt costs one EAGAIN. The bound keeps shutdown() and a worker's signals prompt.
_READY_BATCH = 32

# On Linux an accepted socket never inherits O_NONBLOCK from the listener; on the BSDs and
# macOS it does, so there the accepted socket is put back in blocking mode explicitly.
_ACCEPT_INHERITS_NONBLOCK = not sys.platform.startswith("linux")


class Poller:
    """Waits for readability on a handful of file descriptors.

    epoll on Linux, where a shared listener is registered with ``EPOLLEXCLUSIVE`` so that one
    idle process wakes per connection instead of all of them; ``poll()`` elsewhere. Part of
    the core's extension interface: a worker's loop waits on its listeners, its signal pipe
    and its waiting connections with one.

    Methods for the caller:

    - add(fd, shared=False)
    - wait(timeout) -> [fd, ...]
    - raw_wait() -> wait(timeout) -> [(fd, events), ...]  # the bare call, for hot loops
    - close()   # or use the poller as a context manager
    """

    def __init__(self) -> None:
        self._epoll: Any = _new_epoll()
        self._poll: Any = None if self._epoll is not None else select.poll()

    def add(self, fd: int, *, shared: bool = False) -> None:
        """Watch *fd* for readability; *shared* marks a listener other processes wait on too."""
        if self._epoll is None:
            self._poll.register(fd, select.POLLIN)
            return
        mask = select.EPOLLIN
        if shared and hasattr(select, "EPOLLEXCLUSIVE"):
            try:
                self._epoll.register(fd, mask | select.EPOLLEXCLUSIVE)
                return
            except OSError as exc:
                # Kernels before 4.5 refuse the flag with EINVAL: fall back to a plain watch.
                if exc.errno != errno.EINVAL:
                    raise
        self._epoll.register(fd, mask)

    def wait(self, timeout: float | None) -> list[int]:
        """Return the descriptors that are readable, waiting at most *timeout* seconds."""
        if self._epoll is not None:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        else:
            events = self._poll.poll(None if timeout is None else timeout * 1000.0)
        return [fd for fd, _ in events]

    def raw_wait(self) -> Callable[[float | None], list[tuple[int, int]]]:
        """The bare wait: (fd, events) pairs, timeout in seconds; no wrapper call per turn."""
        if self._epoll is not None:
            return self._epoll.poll  # type: ignore[no-any-return]
        poll = self._poll.poll
        return lambda timeout: poll(None if timeout is None else timeout * 1000.0)

    def close(self) -> None:
        """Release the epoll descriptor (poll() holds none)."""
        if self._epoll is not None:
            self._epoll.close()

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _new_epoll() -> Any:
    """An epoll object; None where there is none, or when no descriptor is left to make one.

    poll() needs no descriptor of its own, so a server out of descriptors (the very reason it
    backs off, and then waits in ``_pause``) still waits with it instead of raising EMFILE.
    """
    if not hasattr(select, "epoll"):
        return None
    try:
        return select.epoll()
    except OSError as exc:
        if exc.errno not in RESOURCE_ERRNOS:
            raise
        return None


class LoopServer(Protocol):
    """What a loop outside the core needs of a server: the core's extension interface.

    ``serve_forever()`` is the core's own loop over one listener; a prefork worker runs one loop
    over all its listeners, its signal pipe and its waiting connections, and an asyncio loop
    will plug in the same way. Such a loop waits on ``fileno()`` with a ``Poller``
    (``shared=True``: other processes wait on the same listener) after ``prepare_listener()``;
    when the listener is readable it calls ``serve_ready()`` (the handler runs now) or
    ``take_request()`` and later ``dispatch_request()`` (the loop holds the connection in
    between); ``service_actions()`` after each turn, ``server_close()`` at the end.

    ``TCPServer``, ``UDPServer``, the Unix servers and every class built on them with the
    mixins implement it.
    """

    RequestHandlerClass: Callable[..., Any]
    socket: socket.socket

    def fileno(self) -> int: ...

    def prepare_listener(self) -> None: ...

    def serve_ready(self, interrupted: Callable[[], bool] | None = None) -> None: ...

    def take_request(self) -> tuple[_RequestType, _AddressType] | None: ...

    def dispatch_request(self, request: _RequestType, client_address: _AddressType) -> None: ...

    def service_actions(self) -> None: ...

    def server_close(self) -> None: ...


class _WakeupChannel:
    """A socket pair that lets another thread wake a waiting loop.

    Socket objects are used instead of raw pipe descriptors on purpose: writing to a closed
    socket object raises OSError instead of writing into whatever file reused the number.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:
            # Full (a wake-up is already pending) or closed (the server is gone): either way
            # there is nothing left to wake.
            pass

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass  # BlockingIOError: empty now, which is the point

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class BaseServer:
    """Base class for server classes.

    Methods for the caller:

    - __init__(server_address, RequestHandlerClass)
    - serve_forever(poll_interval=0.5)
    - shutdown()
    - handle_request()  # if you do not use serve_forever()
    - fileno() -> int   # for selector

    Methods that may be overridden:

    - server_bind()
    - server_activate()
    - get_request() -> request, client_address
    - handle_timeout()
    - verify_request(request, client_address)
    - server_close()
    - process_request(request, client_address)
    - shutdown_request(request)
    - close_request(request)
    - service_actions()
    - handle_error()

    Methods for derived classes:

    - finish_request(request, client_address)

    Class variables that may be overridden by derived classes or instances:

    - timeout
    - address_family
    - socket_type
    - allow_reuse_address
    - allow_reuse_port

    Instance variables:

    - RequestHandlerClass
    - socket
    """

    timeout: float | None = None

    # prefork addition: the wake-up channel of serve_forever(), made on first use.
    _wakeup: _WakeupChannel | None = None

    def __init__(self, server_address: _AddressType, RequestHandlerClass: Callable[..., Any]) -> None:
        """Constructor. May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__is_shut_down = threading.Event()
        self.__shutdown_request = False

    def server_activate(self) -> None:
        """Called by the constructor to activate the server. May be overridden."""

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle one request at a time until shutdown.

        Polls for shutdown every poll_interval seconds, and also wakes at once when
        shutdown() is called from another thread. Ignores self.timeout. Calls
        service_actions() on every turn of the loop.
        """
        self.__is_shut_down.clear()
        try:
            wakeup = self._wakeup_channel()
            with Poller() as poller:
                listener = self.fileno()  # type: ignore[attr-defined]
                self._prepare_listener()
                poller.add(listener, shared=True)
                poller.add(wakeup.fileno())
                wait = poller.raw_wait()
                while not self.__shutdown_request:
                    events = wait(poll_interval)
                    if self.__shutdown_request:
                        break
                    for fd, _ in events:
                        if fd == listener:
                            self._serve_ready()
                        else:
                            wakeup.drain()
                    self.service_actions()
        finally:
            self.__shutdown_request = False
            self.__is_shut_down.set()

    def shutdown(self) -> None:
        """Stop serve_forever() and wait until it has stopped.

        Must be called from another thread than the one running serve_forever(), or it
        deadlocks (as in the standard library).
        """
        self.__shutdown_request = True
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()
        self.__is_shut_down.wait()

    def service_actions(self) -> None:
        """Called by serve_forever() on every turn of its loop. May be overridden."""

    def handle_request(self) -> None:
        """Handle one request, waiting at most the smaller of the socket's and self's timeout."""
        timeout = self._request_timeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self.fileno()  # type: ignore[attr-defined]
        self._prepare_listener()
        with Poller() as poller:
            poller.add(listener, shared=True)
            while True:
                if poller.wait(timeout):
                    self._handle_request_noblock()
                    return
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout < 0:
                        return self.handle_timeout()

    def _request_timeout(self) -> float | None:
        """The wait of handle_request(): the socket's timeout bounded by self.timeout."""
        sock_timeout: float | None = self.socket.gettimeout()  # type: ignore[attr-defined]
        if sock_timeout is None:
            return self.timeout
        if self.timeout is None:
            return sock_timeout
        return min(sock_timeout, self.timeout)

    def _serve_ready(self, interrupted: Callable[[], bool] | None = None) -> None:
        """Handle the request the poller announced, then those already queued behind it.

        Each further request is taken as if the wait had returned at once: service_actions()
        runs between requests, as between turns of serve_forever(). Only where get_request()
        is prefork's own non-blocking one (an override might block); at most _READY_BATCH,
        and none once shutdown() is called or *interrupted()* (a prefork worker's pending
        signal) is true, so a stop never waits behind queued work.
        """
        if not self._handle_request_noblock() or not _takes_batches(type(self)):
            return
        for _ in range(_READY_BATCH - 1):
            self.service_actions()
            if self.__shutdown_request or (interrupted is not None and interrupted()):
                return
            if not self._handle_request_noblock():
                return

    def _handle_request_noblock(self) -> bool:
        """Handle one request, without blocking: the caller knows the listener is readable.

        Returns False if there was no request to take (get_request() failed), else True.
        """
        taken = self._take_request()
        if taken is None:
            return False
        self._dispatch_request(*taken)
        return True

    def _take_request(self) -> tuple[_RequestType, _AddressType] | None:
        """get_request() on a ready listener; None if there was nothing to take (see TCPServer.take_request)."""
        try:
            # get_request() is defined by the concrete servers, as in the stdlib.
            request, client_address = self.get_request()  # type: ignore[attr-defined]
        except OSError as exc:
            self._request_failed(exc)
            return None
        return request, client_address

    def _dispatch_request(self, request: _RequestType, client_address: _AddressType) -> None:
        """verify_request(), then process_request(), as the stdlib serves a request it got."""
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def _request_failed(self, exc: OSError) -> None:
        """get_request() failed: silent after a lost race, logged and backed off when out of resources."""
        if exc.errno in RESOURCE_ERRNOS:
            _resource_limiter.report(exc, self)
            self._pause(_RESOURCE_BACKOFF)
        # Everything else (a lost race, a client that reset before accept) is not an error of
        # this server; the standard library ignores it too.

    def _pause(self, seconds: float) -> None:
        """Sleep *seconds*, but return early if shutdown() is called meanwhile."""
        wakeup = self._wakeup
        if wakeup is None:
            time.sleep(seconds)
            return
        # Not select(): it refuses descriptors >= FD_SETSIZE (1024), and running out of
        # descriptors, the reason for this pause, is exactly when the numbers are high.
        with Poller() as poller:
            poller.add(wakeup.fileno())
            poller.wait(seconds)

    def handle_timeout(self) -> None:
        """Called if no new request arrives within self.timeout. May be overridden."""

    def verify_request(self, request: _RequestType, client_address: _AddressType) -> bool:
        """Return True to process the request, False to refuse it. May be overridden."""
        return True

    def process_request(self, request: _RequestType, client_address: _AddressType) -> None:
        """Call finish_request() and then shutdown_request(). Overridden by the mixins."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Clean up the server. May be overridden."""
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.close()

    def finish_request(self, request: _RequestType, client_address: _AddressType) -> None:
        """Finish one request by instantiating RequestHandlerClass."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: _RequestType) -> None:
        """Called to shut down and close an individual request."""
        self.close_request(request)

    def close_request(self, request: _RequestType) -> None:
        """Called to clean up an individual request."""

    def handle_error(self, request: _RequestType, client_address: _AddressType) -> None:
        """Handle an error raised by a handler gracefully. May be overridden.

        The default prints the traceback to standard error and the server goes on.
        """
        rule = "-" * 40
        print(rule, file=sys.stderr)
        print("Exception occurred during processing of request from", client_address, file=sys.stderr)
        traceback.print_exc()
        print(rule, file=sys.stderr)

    def __enter__(self) -> BaseServer:
        return self

    def __exit__(self, *args: object) -> None:
        # The stdlib's signature, so subclasses that forward *args keep working unchanged.
        self.server_close()

    # -- prefork additions (private to the core) -----------------------------------------------

    def _wakeup_channel(self) -> _WakeupChannel:
        if self._wakeup is None:
            self._wakeup = _WakeupChannel()
        return self._wakeup

    def _prepare_listener(self) -> None:
        """Make the listener safe to share between processes. Socket servers override this."""

    # fileno() is left to the concrete servers on purpose: the stdlib's BaseServer has none,
    # and code written for it may test hasattr(server, "fileno").


class TCPServer(BaseServer):
    """Base class for various socket-based server classes; defaults to TCP over IPv4.

    prefork additions: ``adopt_socket(sock)`` and ``from_socket(sock, handler)`` serve on a
    socket that is already bound and listening (inherited from the master or from systemd);
    ``take_request()`` and ``dispatch_request(request, client_address)`` handle one request in
    two steps, so that a caller can hold a connection in between (a prefork worker waits there
    for the client's first message); ``prepare_listener()`` and ``serve_ready()`` let a loop of
    the caller's own wait on the listener (see ``LoopServer``).

    Methods for a loop of the caller's (the core's extension interface, ``LoopServer``):

    - prepare_listener()                  # once, before waiting on fileno()
    - serve_ready(interrupted=None)       # the listener is readable: serve what waits
    - take_request() -> (request, client_address) | None
    - dispatch_request(request, client_address)

    Methods that may be overridden (prefork additions):

    - prepare_listener()
    """

    address_family = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    request_queue_size = 5
    allow_reuse_address = False
    allow_reuse_port = False

    # True while the socket in use was adopted rather than bound by this server.
    _adopted = False

    def __init__(
        self,
        server_address: _AddressType,
        RequestHandlerClass: Callable[..., Any],
        bind_and_activate: bool = True,
    ) -> None:
        """Constructor. May be extended, do not override."""
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Called by the constructor to bind the socket. May be overridden.

        On an adopted socket nothing is bound again; only server_address is read back, so
        the bookkeeping of subclasses that extend this method still runs.
        """
        if not self._adopted:
            self._set_reuse_options()
            self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def _set_reuse_options(self) -> None:
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def server_activate(self) -> None:
        """Called by the constructor to activate the server. May be overridden."""
        if not self._adopted:
            self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Called to clean up the server. May be overridden."""
        self.socket.close()
        BaseServer.server_close(self)

    def fileno(self) -> int:
        """Return the socket's file descriptor, for selectors."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, _AddressType]:
        """Accept a new connection. May be overridden."""
        listener = self.socket
        if type(listener) is socket.socket:
            conn, address = _accept_plain(listener)
        else:
            # A wrapped listener (ssl.SSLSocket, a test double) keeps its own accept().
            conn, address = listener.accept()
        if _ACCEPT_INHERITS_NONBLOCK:
            conn.setblocking(True)
        return conn, address

    def shutdown_request(self, request: _RequestType) -> None:
        """Half-close the connection for writing, then close it."""
        try:
            # Sending FIN explicitly tells the client the reply is complete, even if a forked
            # child or another reference still keeps the descriptor open.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client may already have gone; closing is all that is left to do
        self.close_request(request)

    def close_request(self, request: _RequestType) -> None:
        """Close the connection."""
        request.close()

    # -- prefork additions -----------------------------------------------------------------------

    def adopt_socket(self, sock: socket.socket, *, bind_and_activate: bool = True) -> None:
        """Serve on *sock*, a socket that is already bound (and, for streams, listening).

        The socket this server created in ``__init__`` is closed. ``server_bind()`` and
        ``server_activate()`` are called as usual, so subclass bookkeeping runs (http.server
        sets ``server_name`` there, wsgiref its base environ), but nothing is bound or
        listened to again. Use with ``bind_and_activate=False`` in the constructor. Called
        from an override of ``server_bind()`` (which the constructor is running), pass
        ``bind_and_activate=False`` here too: the socket is swapped, the rest goes on as usual.
        """
        self.socket.close()
        self.socket = sock
        self.address_family = sock.family
        self._adopted = True
        if sock.type == socket.SOCK_STREAM and not is_listening(sock):
            sock.listen(self.request_queue_size)
        if bind_and_activate:
            self.server_bind()
            self.server_activate()

    # One request in two steps: take_request() is get_request() on a ready listener, None if there
    # was nothing to take (a lost race is silent; running out of descriptors is logged at a bounded
    # rate and followed by a short back-off); dispatch_request(request, client_address) does the
    # rest of what handle_request() does: verify_request(), then process_request(), an exception
    # to handle_error() and the request shut down. The same functions as the loop's own steps, not
    # wrappers: a worker calls them once per connection.
    take_request = BaseServer._take_request
    dispatch_request = BaseServer._dispatch_request

    @classmethod
    def from_socket(
        cls, sock: socket.socket, RequestHandlerClass: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Build a server of this class around *sock* (see ``adopt_socket``).

        Extra arguments go to the class's constructor, which must accept ``bind_and_activate``.
        """
        server = cls(sock.getsockname(), RequestHandlerClass, *args, bind_and_activate=False,  # type: ignore[misc]
                     **kwargs)
        try:
            server.adopt_socket(sock)
        except BaseException:
            server.server_close()
            raise
        return server

    def prepare_listener(self) -> None:
        """Put the listening descriptor in non-blocking mode; call it before waiting on fileno().

        Python's socket object keeps its own notion of a timeout (so ``gettimeout()`` still
        answers as before) while accept() on a connection another process took returns EAGAIN
        instead of blocking this one until the next connection. Called on every entry into a
        loop rather than remembered, because settimeout()/setblocking() on the socket reset
        the flag. May be overridden.
        """
        fd = self.socket.fileno()
        if fd >= 0 and os.get_blocking(fd):
            os.set_blocking(fd, False)

    def serve_ready(self, interrupted: Callable[[], bool] | None = None) -> None:
        """Serve the request(s) waiting on a listener the caller's poller found readable.

        What one turn of ``serve_forever()`` does when woken: the request that woke it, then
        (with prefork's own non-blocking get_request()) up to a small batch of those queued
        behind it, service_actions() between them; none once *interrupted()* is true.
        """
        self._serve_ready(interrupted)

    def _prepare_listener(self) -> None:
        self.prepare_listener()


class UDPServer(TCPServer):
    """UDP server class."""

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    max_packet_size = 8192

    def get_request(self) -> tuple[tuple[bytes, socket.socket], _AddressType]:
        # MSG_DONTWAIT makes only this read non-blocking: replies sent on the same socket by
        # the handler keep blocking semantics (a full send buffer waits instead of failing).
        data, client_addr = self.socket.recvfrom(self.max_packet_size, _DONTWAIT)
        return (data, self.socket), client_addr

    def server_activate(self) -> None:
        """A datagram socket does not listen."""

    def shutdown_request(self, request: _RequestType) -> None:
        """Nothing to shut down: the socket is shared by every datagram."""
        self.close_request(request)

    def close_request(self, request: _RequestType) -> None:
        """Nothing to close: the socket is shared by every datagram."""

    def prepare_listener(self) -> None:
        """Datagram sockets stay blocking; get_request() reads with MSG_DONTWAIT instead."""


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


if hasattr(socket, "AF_UNIX"):
    __all__ += ["UnixStreamServer", "UnixDatagramServer"]

    class UnixStreamServer(TCPServer):
        address_family = socket.AF_UNIX

    class UnixDatagramServer(UDPServer):
        address_family = socket.AF_UNIX


def _takes_batches(cls: type) -> bool:
    """True if *cls* gets requests with prefork's own non-blocking get_request()."""
    return getattr(cls, "get_request", None) in _BATCH_GET_REQUEST


def _accept_plain(listener: socket.socket) -> tuple[socket.socket, Any]:
    """socket.accept() without its two enum conversions per call.

    socket.accept() builds the new socket from ``listener.family`` and ``listener.type``,
    properties that turn the C integers into AddressFamily/SocketKind members through
    Enum.__call__ each time; the constructor takes the plain integers just as well.
    """
    c_level = super(socket.socket, listener)
    timeout = listener.gettimeout()
    if timeout:
        # The application gave the listener a timeout: with one, Python's accept() waits in poll()
        # for up to that long when nothing is queued (a batch's last try, a connection another
        # worker took), holding the whole loop. Accept through a second socket object on the same
        # (non-blocking) descriptor, which has no timeout; the listener's own is never touched,
        # so another thread reading it never sees it change.
        shadow = socket.socket(c_level.family, c_level.type, listener.proto,  # type: ignore[attr-defined]
                               listener.fileno())
        try:
            shadow.setblocking(False)  # no timeout, even under socket.setdefaulttimeout()
            fd, address = shadow._accept()  # type: ignore[attr-defined]
        finally:
            shadow.detach()
    else:
        fd, address = listener._accept()  # type: ignore[attr-defined]
    conn = socket.socket(c_level.family, c_level.type, listener.proto, fd)  # type: ignore[attr-defined]
    if timeout and socket.getdefaulttimeout() is None:
        conn.setblocking(True)  # what socket.accept() does (bpo-7995)
    return conn, address


def is_listening(sock: socket.socket) -> bool:
    """True if the stream socket *sock* listens (SO_ACCEPTCONN); True too where no one can tell."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return True  # the platform cannot tell; assume the owner made it listen


class _RateLimitedReporter:
    """Logs resource failures at most once per interval, with a count of those suppressed."""

    def __init__(self, interval: float) -> None:
        self._limit = RateLimit(interval)
        self._lock = threading.Lock()  # servers of several threads share it

    def report(self, exc: OSError, server: BaseServer) -> None:
        with self._lock:
            suppressed = self._limit.allow()
        if suppressed is None:
            return
        log.error(
            "cannot take new requests on %s: %s (%d similar errors suppressed); backing off %.0f ms",
            getattr(server, "server_address", "?"),
            exc.strerror or exc,
            suppressed,
            _RESOURCE_BACKOFF * 1000,
        )


_resource_limiter = _RateLimitedReporter(_RESOURCE_LOG_INTERVAL)


if TYPE_CHECKING:
    def _is_a_loop_server(server: TCPServer) -> LoopServer:
        return server  # checked by mypy: TCPServer (so every socket server) implements LoopServer


# The get_request() methods that never block (on a listener prepare_listener() made non-blocking).
_BATCH_GET_REQUEST = (TCPServer.get_request, UDPServer.get_request)
