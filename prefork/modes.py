"""What runs inside a worker: sync, thread or fork mode server classes. Runs in: worker.

A worker runs the synchronous BaseServer loop. In thread mode each request gets a thread, at
most ``threads`` at once: when all are busy the worker stops taking connections, which stay in
the shared backlog for another worker instead of piling up in this one. In fork mode each
request gets a child process (ForkingMixIn, bounded by its ``max_children``).
"""

from __future__ import annotations

import threading
from typing import Any

from prefork.mixins import ForkingMixIn, ThreadingMixIn
from prefork.servers import BaseServer

__all__ = ["BoundedThreadingMixIn", "server_class_for", "MODES"]

MODES = ("sync", "thread", "fork")


class BoundedThreadingMixIn(ThreadingMixIn):
    """ThreadingMixIn with at most ``max_threads`` request threads at a time."""

    max_threads = 16
    _slots_free: threading.BoundedSemaphore | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots_free is None:
            self._slots_free = threading.BoundedSemaphore(self.max_threads)
        self._slots_free.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots_free.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            assert self._slots_free is not None
            self._slots_free.release()


def server_class_for(mode: str, base: type[BaseServer], threads: int = 16) -> type[BaseServer]:
    """The server class a worker builds for *mode* on top of *base* (the app's server class).

    A base that already mixes in threading or forking is used as it is.
    """
    if mode == "sync" or issubclass(base, (ThreadingMixIn, ForkingMixIn)):
        return base
    if mode == "thread":
        attrs = {"max_threads": threads, "daemon_threads": True}
        return type(f"Threading{base.__name__}", (BoundedThreadingMixIn, base), attrs)
    if mode == "fork":
        return type(f"Forking{base.__name__}", (ForkingMixIn, base), {})
    raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
