"""Process statistics and process titles, read from real child processes."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from typing import Iterator

import psutil
import pytest

import prefork.procstats as procstats
from prefork.procstats import CpuSampler, ProcStats, rss, stats
from prefork.proctitle import title_for
from tests.support import wait_until

# How long a helper process may take to start, answer, or exit.
CHILD_DEADLINE = 10.0
MiB = 1024 * 1024
# What the memory-holding child keeps resident: well above an idle interpreter's RSS (~10 MiB).
BIG = 64 * MiB
# Page-level noise between two readings of an idle process (the interpreter's own allocations).
RSS_SLACK = 2 * MiB
# CPU time the busy child must burn between two samples: long enough that clock granularity
# (10 ms ticks) is noise, short enough to keep the test quick.
BURN = 0.3

IDLE = "import sys; print('ready', flush=True); sys.stdin.read()"
HOLDS_MEMORY = f"import sys; big = b'x' * {BIG}; print('ready', flush=True); sys.stdin.read()"
HOLDS_FDS = ("import os, sys; fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(50)]; "
             "print('ready', flush=True); sys.stdin.read()")
# Spins until its stdin closes (a thread waits for EOF, the main thread burns CPU).
BUSY = ("import sys, threading; t = threading.Thread(target=sys.stdin.read, daemon=True); t.start(); "
        "print('ready', flush=True)\nwhile t.is_alive(): pass")


@contextlib.contextmanager
def child(code: str) -> Iterator[subprocess.Popen[str]]:
    """A Python child running *code*, once it has printed its first line; reaped at the end."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert readline(proc) == "ready"
        yield proc
    finally:
        stop(proc)


def readline(proc: subprocess.Popen[str], timeout: float = CHILD_DEADLINE) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child {proc.pid} wrote nothing within {timeout}s"
    return proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> None:
    if not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(timeout=CHILD_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=CHILD_DEADLINE)
    proc.stdout.close()


@contextlib.contextmanager
def zombie() -> Iterator[int]:
    """The pid of a child that has exited but is not reaped yet; reaped at the end."""
    with child(IDLE) as proc:
        proc.stdin.close()
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=CHILD_DEADLINE)
        yield proc.pid


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=CHILD_DEADLINE)
    return proc.pid


# -- rss ---------------------------------------------------------------------------------------

def test_rss_counts_resident_memory() -> None:
    with child(IDLE) as small, child(HOLDS_MEMORY) as big:
        small_rss, big_rss = rss(small.pid), rss(big.pid)
        assert small_rss is not None and big_rss is not None
        assert big_rss >= BIG
        assert big_rss - small_rss >= BIG - RSS_SLACK


def test_rss_agrees_with_psutil() -> None:
    with child(HOLDS_MEMORY) as proc:
        assert abs(rss(proc.pid) - psutil.Process(proc.pid).memory_info().rss) <= RSS_SLACK


def test_rss_without_proc_statm_uses_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    with child(HOLDS_MEMORY) as proc:
        from_statm = rss(proc.pid)
        monkeypatch.setattr(procstats, "_HAVE_STATM", False)
        from_psutil = rss(proc.pid)
        assert from_statm is not None and from_psutil is not None
        assert from_psutil >= BIG and abs(from_statm - from_psutil) <= RSS_SLACK
        assert rss(dead_pid()) is None


def test_rss_of_a_gone_process() -> None:
    assert rss(dead_pid()) is None


def test_rss_of_a_zombie_is_zero() -> None:
    # Exited, not reaped: nothing resident, so never over max_worker_memory.
    with zombie() as pid:
        assert rss(pid) == 0


# -- stats -------------------------------------------------------------------------------------

def test_stats_of_a_live_process() -> None:
    with child(HOLDS_FDS) as proc:
        reading = stats(proc.pid)
        assert isinstance(reading, ProcStats)
        assert reading.pid == proc.pid
        assert reading.rss > 0
        assert reading.uss is None, "USS is costly: only when asked for"
        assert reading.cpu_percent is None, "no sampler, no previous reading"
        assert reading.cpu_seconds > 0  # it started an interpreter
        assert reading.create_time == psutil.Process(proc.pid).create_time()
        assert reading.num_fds is not None and reading.num_fds >= 50 + 3


def test_uss_counts_private_memory() -> None:
    with child(HOLDS_MEMORY) as proc:
        reading = stats(proc.pid, with_uss=True)
        assert reading is not None and reading.uss is not None
        assert BIG <= reading.uss <= reading.rss


def test_uss_denied_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: psutil.Process) -> None:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "memory_full_info", denied)
    monkeypatch.setattr(psutil.Process, "num_fds", denied)
    with child(IDLE) as proc:
        reading = stats(proc.pid, with_uss=True)
        assert reading is not None and reading.rss > 0
        assert reading.uss is None and reading.num_fds is None


def test_stats_of_a_gone_process() -> None:
    assert stats(dead_pid()) is None


def test_stats_of_a_zombie() -> None:
    with zombie() as pid:
        assert stats(pid) is None


# -- CpuSampler --------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sampler_arithmetic() -> None:
    clock = FakeClock()
    sampler = CpuSampler(clock)
    assert sampler.sample(7, cpu_seconds=1.0, create_time=5.0) is None, "first reading: no rate yet"
    clock.now += 2.0
    assert sampler.sample(7, cpu_seconds=2.0, create_time=5.0) == pytest.approx(50.0)
    clock.now += 0.5
    assert sampler.sample(7, cpu_seconds=3.0, create_time=5.0) == pytest.approx(200.0)  # two threads


def test_sampler_does_not_mix_up_a_reused_pid() -> None:
    clock = FakeClock()
    sampler = CpuSampler(clock)
    sampler.sample(7, cpu_seconds=50.0, create_time=5.0)
    clock.now += 1.0
    assert sampler.sample(7, cpu_seconds=0.1, create_time=9.0) is None, "another process, same pid"
    clock.now += 1.0
    assert sampler.sample(7, cpu_seconds=0.6, create_time=9.0) == pytest.approx(50.0)


def test_sampler_without_elapsed_time() -> None:
    sampler = CpuSampler(FakeClock())
    sampler.sample(7, cpu_seconds=1.0, create_time=5.0)
    assert sampler.sample(7, cpu_seconds=1.5, create_time=5.0) is None


def test_sampler_forget_and_retain() -> None:
    clock = FakeClock()
    sampler = CpuSampler(clock)
    for pid in (1, 2, 3):
        sampler.sample(pid, cpu_seconds=0.0, create_time=5.0)
    sampler.forget(1)
    sampler.retain([2])
    clock.now += 1.0
    readings = {pid: sampler.sample(pid, cpu_seconds=0.5, create_time=5.0) for pid in (1, 2, 3)}
    assert readings == {1: None, 2: pytest.approx(50.0), 3: None}


def test_sampler_busy_and_idle_processes() -> None:
    sampler = CpuSampler()
    with child(BUSY) as busy, child(IDLE) as idle:
        assert sampler.percent(busy.pid) is None and sampler.percent(idle.pid) is None
        start = stats(busy.pid).cpu_seconds
        wait_until(lambda: stats(busy.pid).cpu_seconds >= start + BURN, timeout=CHILD_DEADLINE)
        busy_percent, idle_percent = sampler.percent(busy.pid), sampler.percent(idle.pid)
    assert busy_percent is not None and busy_percent >= 10.0
    assert idle_percent is not None and idle_percent < 5.0


def test_sampler_of_a_gone_process() -> None:
    assert CpuSampler().percent(dead_pid()) is None


# -- process titles ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, title", [
    (("master", "echo"), "prefork: master [echo]"),
    (("worker", "echo", 3, 2), "prefork: worker 3 [echo] gen 2"),
    (("worker", "echo", 0), "prefork: worker 0 [echo]"),
    (("master", "echo", None, 2), "prefork: master [echo] gen 2"),
    (("worker", "my\napp\0x", 1, 0), "prefork: worker 1 [my app x] gen 0"),
])
def test_title_for(args: tuple, title: str) -> None:
    assert title_for(*args) == title


SETS_ITS_TITLE = ("import sys; from prefork.proctitle import set_title; "
                  "print(set_title('worker', 'echo', 3, 2), flush=True); sys.stdin.read()")


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read().rstrip(b"\0").decode()


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as file:
        return file.read().rstrip("\n")


def test_set_title_shows_in_ps() -> None:
    title = "prefork: worker 3 [echo] gen 2"
    proc = subprocess.Popen([sys.executable, "-c", SETS_ITS_TITLE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert readline(proc) == "True"
        assert cmdline(proc.pid) == title  # what `ps -f` shows
        assert comm(proc.pid) == title[:15]  # what `top` shows: the kernel keeps 15 bytes
    finally:
        stop(proc)


def test_without_setproctitle_nothing_happens() -> None:
    # The import fails (as if not installed): set_title reports False and the title stays.
    code = "import sys; sys.modules['setproctitle'] = None\n" + SETS_ITS_TITLE
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert readline(proc) == "False"
        assert cmdline(proc.pid).startswith(sys.executable)
    finally:
        stop(proc)
