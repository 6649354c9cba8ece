"""Per-request concurrency mixins and the ready-made servers built on them. Runs in: worker.

``ForkingMixIn`` serves each request in a child process, ``ThreadingMixIn`` in a thread
(``TLSMixIn``, a prefork addition, serves stream requests over TLS). Both
have the names, attributes and defaults of the standard library's mixins; two details differ
on purpose, and neither changes a documented meaning:

- ``ForkingMixIn`` reaps only its own children. When ``max_children`` is reached it waits for
  one of *them* (through pidfds on Linux) instead of ``waitpid(-1)``, which would steal the exit
  status of any other child of the process, a worker's supervisor thread or a test harness.
- ``ThreadingMixIn`` threads remove themselves from the tracked set when they end, so forgetting
  finished threads costs nothing per request.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from typing import Any

from prefork.servers import TCPServer, UDPServer

__all__ = [
    "TLSMixIn",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
]

log = logging.getLogger("prefork.server")

# Longest pause between two looks at our children when pidfds are not available.
_CHILD_POLL_MAX = 0.05


class ThreadingMixIn:
    """Mix-in class to handle each request in a new thread.

    ``daemon_threads``: whether request threads are daemonic (do not block interpreter exit).
    ``block_on_close``: whether ``server_close()`` waits for the request threads to end.
    """

    daemon_threads = False
    block_on_close = True
    # Tracked request threads; a class-level empty tuple means "not tracking" until the first
    # request of a server with block_on_close gives the instance a set of its own.
    _threads: Any = ()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one request in this thread; the same as BaseServer.process_request, in a thread."""
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread to serve the request."""
        args = (request, client_address)
        tracked = self._tracked_threads()
        if tracked is None:
            thread = threading.Thread(target=self.process_request_thread, args=args)
        else:
            thread = _TrackedThread(tracked, target=self.process_request_thread, args=args)
            tracked.add(thread)
        thread.daemon = self.daemon_threads
        thread.start()

    def _tracked_threads(self) -> set[threading.Thread] | None:
        """The set server_close() joins, or None when request threads are not waited for.

        As in the stdlib, daemon threads are never waited for, whatever block_on_close says.
        """
        if not self.block_on_close or self.daemon_threads:
            return None
        tracked = self.__dict__.get("_threads")
        if tracked is None:
            tracked = self._threads = set()
        return tracked

    def server_close(self) -> None:
        """Close the server, then wait for the request threads if block_on_close is set."""
        super().server_close()  # type: ignore[misc]
        tracked = self.__dict__.get("_threads")
        if tracked:
            for thread in list(tracked):
                thread.join()


class TLSMixIn:
    """Mix-in class to serve each stream request over TLS (a prefork addition, not in the stdlib).

    Set ``ssl_context`` (an ``ssl.SSLContext`` for the server side: ``PROTOCOL_TLS_SERVER`` with
    its certificate loaded) on the class or the instance, and place the mixin first::

        class Server(TLSMixIn, ThreadingMixIn, TCPServer): ...
        server = Server(("0.0.0.0", 8443), Handler)
        server.ssl_context = context

    The handshake runs in ``finish_request``: in the request's own thread or child with
    ``ThreadingMixIn`` or ``ForkingMixIn`` (never in the accepting loop), bounded by
    ``handshake_timeout`` seconds. The handler gets the ``ssl.SSLSocket`` as ``self.request``,
    with the connection's own timeout restored. A failed handshake is logged in one line on
    ``prefork.server`` (no traceback) and the connection closed. Without ThreadingMixIn or
    ForkingMixIn, one slow handshake holds the server up to ``handshake_timeout``. Under a
    prefork master use ``?tls`` in the bind spec instead, which handshakes without blocking
    the worker (the request is then already an ``ssl.SSLSocket``, and this mixin leaves it).
    """

    ssl_context: ssl.SSLContext | None = None
    handshake_timeout: float | None = 5.0

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handshake (unless already done), then finish the request over TLS and close it."""
        context = self.ssl_context
        if context is None or isinstance(request, ssl.SSLSocket) or not isinstance(request, socket.socket):
            super().finish_request(request, client_address)  # type: ignore[misc]
            return
        timeout = request.gettimeout()
        request.settimeout(self.handshake_timeout)
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            tls.settimeout(timeout)
            super().finish_request(tls, client_address)  # type: ignore[misc]
        finally:
            self.shutdown_request(tls)  # type: ignore[attr-defined]  # the wrapped socket took the descriptor


class _TrackedThread(threading.Thread):
    """A request thread that leaves its server's tracked set when it ends.

    The target stays ``process_request_thread`` so the default thread name is the stdlib's,
    "Thread-N (process_request_thread)", which handlers may show (the documented example does).
    """

    def __init__(self, tracked: set[threading.Thread], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prefork_tracked = tracked

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._prefork_tracked.discard(self)


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


if hasattr(os, "fork"):
    __all__ += ["ForkingMixIn", "ForkingTCPServer", "ForkingUDPServer"]

    class ForkingMixIn:
        """Mix-in class to handle each request in a new process.

        ``max_children``: at most this many children at once; the server waits for one to end
        before forking more. ``block_on_close``: whether ``server_close()`` waits for the
        children. ``active_children``: the set of pids not yet reaped (None before the first).
        Children are reaped in ``handle_timeout()`` and ``service_actions()``.
        """

        timeout: float | None = 300
        active_children: set[int] | None = None
        max_children = 40
        block_on_close = True

        def collect_children(self, *, blocking: bool = False) -> None:
            """Reap finished children; wait for one while there are max_children of them."""
            if self.active_children is None:
                return
            while len(self.active_children) >= self.max_children:
                if not _wait_for_any(self.active_children):
                    break
            for pid in list(self.active_children):
                _reap(self.active_children, pid, blocking)

        def handle_timeout(self) -> None:
            """No request came in time: reap what has finished."""
            self.collect_children()

        def service_actions(self) -> None:
            """Reap finished children on every turn of serve_forever()."""
            self.collect_children()

        def process_request(self, request: Any, client_address: Any) -> None:
            """Fork a child to serve the request; the child leaves only through os._exit()."""
            pid = os.fork()
            if pid:
                if self.active_children is None:
                    self.active_children = set()
                self.active_children.add(pid)
                self.close_request(request)  # type: ignore[attr-defined]
                return
            self._serve_in_child(request, client_address)

        def _serve_in_child(self, request: Any, client_address: Any) -> None:
            """Called in the child. Never returns: a child must not run its parent's loop."""
            status = 1
            try:
                self.finish_request(request, client_address)  # type: ignore[attr-defined]
                status = 0
            except Exception:
                self.handle_error(request, client_address)  # type: ignore[attr-defined]
            finally:
                try:
                    self.shutdown_request(request)  # type: ignore[attr-defined]
                finally:
                    os._exit(status)

        def server_close(self) -> None:
            """Close the server, then reap the children (waiting for them if block_on_close)."""
            super().server_close()  # type: ignore[misc]
            self.collect_children(blocking=self.block_on_close)

    class ForkingUDPServer(ForkingMixIn, UDPServer):
        pass

    class ForkingTCPServer(ForkingMixIn, TCPServer):
        pass


if hasattr(socket, "AF_UNIX"):
    from prefork.servers import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadingUnixStreamServer", "ThreadingUnixDatagramServer"]

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
        pass

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
        pass

    if hasattr(os, "fork"):
        __all__ += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
            pass

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
            pass


def _reap(children: set[int], pid: int, blocking: bool) -> bool:
    """Reap *pid* if it has ended (or wait for it if *blocking*); True if it is gone."""
    try:
        done, _ = os.waitpid(pid, 0 if blocking else os.WNOHANG)
    except ChildProcessError:
        done = pid  # already reaped elsewhere, or not our child after all: forget it
    if done:
        children.discard(pid)
        return True
    return False


def _wait_for_any(children: set[int]) -> bool:
    """Block until one of *children* ends and reap it. False if none can be waited for."""
    if not children:
        return False
    if hasattr(os, "pidfd_open"):
        return _wait_with_pidfds(children)
    return _wait_by_polling(children)


def _wait_with_pidfds(children: set[int]) -> bool:
    fds: dict[int, int] = {}
    try:
        for pid in list(children):
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                children.discard(pid)  # gone and reaped already: room has been made
                return True
        # poll(), not select(): pidfds of a busy process are often numbered >= FD_SETSIZE.
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll()]
        return any(_reap(children, fds[fd], blocking=True) for fd in ready)
    finally:
        for fd in fds:
            os.close(fd)


def _wait_by_polling(children: set[int]) -> bool:
    pause = 0.001
    while children:
        if any(_reap(children, pid, blocking=False) for pid in list(children)):
            return True
        time.sleep(pause)
        pause = min(pause * 2, _CHILD_POLL_MAX)
    return False
