"""Signal plumbing shared by the master and the workers. Runs in: both.

Rules:

1. A handler stores the signal number and returns: no logging, no I/O, no locks. The loop
   that owns the signals wakes on the ``set_wakeup_fd`` pipe and does the work itself.
2. Handlers are installed by ``SignalQueue`` as a context manager that restores the previous
   handlers and wake-up fd on exit, so tests and embedding code get back what they had.
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType
from typing import Iterable, Iterator

__all__ = ["MASTER_SIGNALS", "WORKER_SIGNALS", "SignalQueue", "signal_name", "reset_to_defaults", "blocked"]

# What the master answers, in the order of the README's table.
MASTER_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD,
)

# What a worker answers: stop gracefully, stop now, reopen logs.
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1)

# Room for signals that arrive between two turns of the loop; more of the same kind is no news.
_QUEUE_LIMIT = 64


def signal_name(signum: int) -> str:
    """'TERM' for SIGTERM: the name used in handle_<name>() methods and in logs."""
    return signal.Signals(signum).name.removeprefix("SIG")


class SignalQueue:
    """Records the signals in *signums* and wakes a loop through a pipe.

    ``fileno()`` is the read end to wait on; ``pop_all()`` returns what arrived, in order.
    """

    def __init__(self, signums: Iterable[int]) -> None:
        self._signums = tuple(signums)
        self._pending: list[int] = []
        self._read_fd = self._write_fd = -1
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    def __enter__(self) -> SignalQueue:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self._signums:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the previous handlers and wake-up fd, and close the pipe."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._write_fd >= 0:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1

    def forget(self) -> None:
        """Called in a forked child: drop the parent's pipe without touching handlers or wake-up fd."""
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1
        self._previous.clear()
        self._pending.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if len(self._pending) < _QUEUE_LIMIT:
            self._pending.append(signum)

    def fileno(self) -> int:
        return self._read_fd

    def has_pending(self) -> bool:
        """True if a signal arrived since the last pop_all() (no system call)."""
        return bool(self._pending)

    def pop_all(self) -> list[int]:
        """The signals recorded since the last call, oldest first; drains the wake-up pipe."""
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass  # drained
        pending, self._pending = self._pending, []
        return pending

    def push(self, signum: int) -> None:
        """Queue a signal as if it had been received (tests and internal requests)."""
        self._record(signum, None)
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already due to wake


def reset_to_defaults(signums: Iterable[int]) -> None:
    """Called in the child after fork: default handlers, no wake-up fd inherited from the parent.

    Then *signums* are unblocked: what arrived since the fork (held by ``blocked``) now takes
    its default effect, and a TERM stops a worker that had not yet installed its own handlers.
    """
    signums = tuple(signums)
    signal.set_wakeup_fd(-1)
    for signum in signums:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


@contextlib.contextmanager
def blocked(signums: Iterable[int]) -> Iterator[None]:
    """Hold *signums* pending for the block (around fork in the master), then restore the mask.

    A forked child inherits the blocked mask; it calls ``reset_to_defaults``, which unblocks
    them once its parent's handlers are gone, so a signal sent to the child in between is
    delivered to the child's own disposition instead of to the parent's handler, which records
    it in a queue the child throws away.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
