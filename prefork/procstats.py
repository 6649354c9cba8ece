"""Memory and CPU of the master's workers, for recycling and ``prefork status``. Runs in: master.

Rules:

1. A process that is gone (or a zombie waiting to be reaped) has no statistics: the functions
   return None rather than raise, because a worker may exit between any two lines of the master.
2. ``rss`` is the cheap one, read on every tick for ``max_worker_memory``: on Linux it reads
   ``/proc/PID/statm`` directly (one small read, no psutil objects). Everything else goes
   through psutil.
3. RSS counts pages shared with the master (copy-on-write after ``preload``) in every worker;
   USS (``with_uss``) counts only a worker's own pages, but costs a walk of its smaps.
4. CPU percentages need two readings: ``CpuSampler`` keeps the previous one per process, keyed
   by pid *and* start time so that a reused pid never borrows another process's history.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Iterable

import psutil

__all__ = ["ProcStats", "stats", "rss", "CpuSampler"]

log = logging.getLogger("prefork.procstats")

# statm reports pages; the page size cannot change while we run.
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# statm exists only where /proc is Linux's.
_HAVE_STATM = sys.platform.startswith("linux")


@dataclasses.dataclass(frozen=True)
class ProcStats:
    """One reading of one process."""

    pid: int
    rss: int  # resident set size, bytes
    uss: int | None  # unique set size, bytes; None unless asked for, or not permitted
    cpu_percent: float | None  # since the sampler's previous reading; None without one
    cpu_seconds: float  # user + system time since the process started
    create_time: float  # start time, seconds since the epoch (psutil's clock)
    num_fds: int | None  # open file descriptors; None if not permitted


def stats(pid: int, *, with_uss: bool = False, sampler: CpuSampler | None = None) -> ProcStats | None:
    """A reading of *pid*, or None if it is gone; *sampler* supplies ``cpu_percent``."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return _read(proc, with_uss, sampler)
    except psutil.NoSuchProcess:  # includes ZombieProcess
        return None


def rss(pid: int) -> int | None:
    """Resident set size of *pid* in bytes, or None if it is gone."""
    if not _HAVE_STATM:
        return _psutil_rss(pid)
    try:
        with open(f"/proc/{pid:d}/statm", "rb") as file:
            fields = file.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return None  # gone: /proc/PID vanished, or vanished while we read it
    # statm: size resident shared text lib data dt, in pages. A zombie reads all zeros.
    return int(fields[1]) * _PAGE_SIZE if len(fields) > 1 else None


class CpuSampler:
    """CPU percent of each process between two successive readings, as ``top`` shows it.

    100 means one core's worth; a process with busy threads can show more.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # pid -> (create_time, cpu_seconds, clock) of the previous reading
        self._last: dict[int, tuple[float, float, float]] = {}

    def sample(self, pid: int, cpu_seconds: float, create_time: float) -> float | None:
        """Record a reading of *pid*; percent since its previous one, None for the first."""
        now = self._clock()
        previous = self._last.get(pid)
        self._last[pid] = (create_time, cpu_seconds, now)
        if previous is None or previous[0] != create_time or now <= previous[2]:
            return None
        return max(0.0, cpu_seconds - previous[1]) * 100.0 / (now - previous[2])

    def percent(self, pid: int) -> float | None:
        """Read *pid* now and return ``sample``'s answer; None if it is gone."""
        reading = stats(pid, sampler=self)
        return None if reading is None else reading.cpu_percent

    def forget(self, pid: int) -> None:
        self._last.pop(pid, None)

    def retain(self, pids: Iterable[int]) -> None:
        """Drop the history of every process not in *pids* (those that have exited)."""
        keep = set(pids)
        for pid in [pid for pid in self._last if pid not in keep]:
            del self._last[pid]


def _read(proc: psutil.Process, with_uss: bool, sampler: CpuSampler | None) -> ProcStats:
    times = proc.cpu_times()
    cpu_seconds = times.user + times.system
    create_time = proc.create_time()
    return ProcStats(
        pid=proc.pid,
        rss=proc.memory_info().rss,
        uss=_uss(proc) if with_uss else None,
        cpu_percent=sampler.sample(proc.pid, cpu_seconds, create_time) if sampler else None,
        cpu_seconds=cpu_seconds,
        create_time=create_time,
        num_fds=_num_fds(proc),
    )


def _uss(proc: psutil.Process) -> int | None:
    try:
        return proc.memory_full_info().uss
    except psutil.AccessDenied:  # another user's process: smaps is not ours to read
        log.debug("no USS for pid %d: access denied", proc.pid)
        return None


def _num_fds(proc: psutil.Process) -> int | None:
    try:
        return proc.num_fds()
    except psutil.AccessDenied:  # another user's process: /proc/PID/fd is not ours to list
        return None


def _psutil_rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return None
