"""A handle on each child process of the master: fork, signal, reap, stop. Runs in: master.

Rules:

1. With ``prefork.arbiter``, which decides when, this is the only module that calls ``os.fork``,
   ``os.kill`` and ``os.waitpid``. Every child (a worker, the metrics process, the new master of
   an upgrade) is a ``Child``; the arbiter's loop reaps them all with ``reap_exited()``.
2. A handle never signals a child it has seen reaped: the kernel may have given the pid to
   another process since.
3. Stopping escalates once, here: the signal asked for, then SIGKILL for what is left after the
   grace, each step bounded by a deadline (``stop_all``). It is used on the way out, where the
   loop that reaps no longer runs; while the loop runs, the pool's policy escalates for workers.
4. A child that must say how its start went (the metrics process: is its port bound?) writes
   once on a pipe (``send_start_report``); the master reads it with a deadline
   (``read_start_report``).
"""

from __future__ import annotations

import os
import resource
import select
import signal
import time
from typing import Callable, Iterable, Iterator

from prefork.signals import blocked
from prefork.worker import flush_std_streams

__all__ = ["Child", "reap_exited", "read_start_report", "send_signal", "send_start_report", "stop_all"]

# While a stop waits for children to leave, how often it looks (a short, bounded wait).
REAP_POLL = 0.01
# Exit status of a child whose body returned or raised instead of leaving by os._exit (a bug).
BODY_RETURNED = 70


class Child:
    """One child process of the master, from its fork to its reaping."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.reaped = False

    @classmethod
    def fork(cls, body: Callable[[], object], block: Iterable[int] = ()) -> Child:
        """Fork a child that runs *body*, which leaves by ``os._exit``; OSError if fork fails.

        *block*: signals held pending across the fork (the child unblocks them once its
        parent's handlers are gone, see ``prefork.signals.blocked``).
        """
        flush_std_streams()  # what is buffered would otherwise be written twice
        with blocked(block):
            pid = os.fork()
            if pid == 0:
                try:
                    body()  # called in the child
                finally:
                    os._exit(BODY_RETURNED)  # never back into the master's code
        return cls(pid)

    def send(self, signum: int) -> None:
        """Send *signum*, unless the child is gone."""
        if not self.reaped:
            send_signal(self.pid, signum)

    def abort(self) -> None:
        """SIGABRT, so that a hung worker dumps its tracebacks, without a core file."""
        _no_core_dump(self.pid)
        self.send(signal.SIGABRT)
        # A stopped child (SIGSTOP, a debugger) cannot dump its traceback until it runs.
        self.send(signal.SIGCONT)

    def exited(self) -> None:
        """``reap_exited()`` has reaped it."""
        self.reaped = True

    def wait(self, deadline: float) -> bool:
        """Reap it once it has exited, waiting until *deadline* at most; True when it is gone
        (also when something else reaped it already)."""
        while not self.reaped:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid
            if done:
                self.reaped = True
            elif time.monotonic() >= deadline:
                return False
            else:
                time.sleep(REAP_POLL)
        return True

    def stop(self, grace: float, signum: int = signal.SIGTERM) -> None:
        """*signum*, then SIGKILL if it is still there after *grace*; reaped when it returns
        (unless even SIGKILL took longer than *grace*)."""
        stop_all([self], grace, signum)


def stop_all(children: Iterable[Child], grace: float, signum: int = signal.SIGTERM) -> None:
    """Send *signum* to every child still there, reap them for up to *grace*, then the same with
    SIGKILL for those left (once only when *signum* is SIGKILL)."""
    children = list(children)
    for step in dict.fromkeys((signum, signal.SIGKILL)):
        left = [child for child in children if not child.reaped]
        for child in left:
            child.send(step)
        deadline = time.monotonic() + grace
        for child in left:
            child.wait(deadline)


def reap_exited() -> Iterator[tuple[int, int]]:
    """(pid, exit code) of each child that has exited, without waiting: workers, the master's
    other children, and those a hook started (which the arbiter ignores)."""
    pid = -1
    while pid:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)  # (0, 0): none has exited (yet)
        except ChildProcessError:
            return  # no child at all
        if pid:
            yield pid, os.waitstatus_to_exitcode(status)


def send_signal(pid: int, signum: int) -> None:
    """Send *signum* to *pid* (a child, or the old master in an upgrade) if it still exists."""
    if pid <= 0:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it exited already; a child's exit is reaped in the loop


def read_start_report(fd: int, timeout: float) -> bytes:
    """What a child writes on *fd* until it closes it (or *timeout* passes): how its start went."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            break
        data += chunk
    return data


def send_start_report(fd: int, data: bytes) -> None:
    """Called in a child: say how starting went, once, and close."""
    try:
        os.write(fd, data)
        os.close(fd)
    except OSError:
        pass  # the master stopped listening (a restart it does not wait for)


def _no_core_dump(pid: int) -> None:
    """A worker aborted for a timeout dumps its tracebacks; a core file of it would only fill disks."""
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_CORE)
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, hard))
    except (OSError, AttributeError):
        pass  # gone already, not permitted, or not Linux: the system's core settings apply
