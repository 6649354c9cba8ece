"""Soak: operator signals in a loop, recycling by the thousand, a worker out of descriptors,
a handler that leaks memory; each against real masters under a threaded echo load on loopback.

The masters, loads and teardown are the integration suite's (tests/integration/conftest.py);
the service is tests/reliability/soak_app.py. The module takes about a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Iterator

import psutil
import pytest

from prefork import servers
from tests.integration.conftest import ROOT, wait_pid_gone
from tests.reliability.soak_app import LOW_NOFILE
from tests.support import SOCKET_TIMEOUT, heavy, kill_process_group, wait_until

pytestmark = [pytest.mark.reliability, heavy]

SOAK_APP = "tests.reliability.soak_app"
WORKERS = 2
CLIENTS = 4
# Generous bound on one step (a USR2 starts a whole new master): it bounds hangs, it does not
# measure speed, and the machine is shared.
STEP_TIMEOUT = 60.0


# -- 1. operator signals in a loop ---------------------------------------------------------------

# How long the operator keeps signalling, and the clients meanwhile. Their requests are
# ``slow`` ones, in flight when the signals arrive; that also keeps each client far below the
# load's own bound of 100,000 requests, however fast the machine.
SIGNAL_SOAK_SECONDS = 30.0
SIGNAL_SOAK_CLIENTS = 8
# The order the signals are sent in, over and over: every kind each turn, the pool grows to 3
# and shrinks to 1, and HUP and USR2 each find a pool of another size than configured.
SIGNAL_CYCLE = (signal.SIGTTIN, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2,
                signal.SIGTTOU)


class _Operator:
    """Sends one signal at a time to the current master and waits until it took effect.

    The current master is the one the pidfile names: USR2 starts a new one that replaces the
    old. Every master stays in the test's process group, so teardown stops them all.
    """

    def __init__(self, master: Any) -> None:
        self.master = master
        self.pid: int = master.pid
        self.size = WORKERS
        self.sent: Counter[str] = Counter()

    def send(self, signum: signal.Signals) -> None:
        self.sent[signum.name] += 1
        if signum == signal.SIGUSR2:
            self._upgrade()
            return
        generation = self._generation()
        os.kill(self.pid, signum)
        if signum == signal.SIGHUP:
            self.size = WORKERS  # a reload reads the configuration again, `workers` included
            generation += 1
        elif signum == signal.SIGTTIN:
            self.size += 1
        else:
            self.size = max(1, self.size - 1)
        self.master.wait_workers(self.size, generation=generation, timeout=STEP_TIMEOUT)

    def _generation(self) -> int:
        (generation,) = {view.generation for view in self.master.workers()}  # settled: just one
        return generation

    def _upgrade(self) -> None:
        old = self.pid
        os.kill(old, signal.SIGUSR2)
        wait_until(lambda: _pidfile_pid(self.master) not in (None, old), STEP_TIMEOUT,
                   message=f"the pidfile never named a new master:\n{self.master.log()}")
        self.pid = _pidfile_pid(self.master) or 0
        wait_pid_gone(old, timeout=STEP_TIMEOUT)
        self.size = WORKERS  # the new master runs with the command line's configuration
        self.master.wait_workers(WORKERS, generation=1, timeout=STEP_TIMEOUT)


def _pidfile_pid(master: Any) -> int | None:
    try:
        return int(master.pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return None  # between the old master's rename and the new master's write


def test_hup_usr2_ttin_ttou_in_a_loop_under_load_fail_no_request(start_master, load):
    # Found here: after USR2 the old master's workers drained the shared listener as for a stop
    # of the whole service; under steady load it is never empty, so they served on until
    # graceful_timeout and were killed with requests in flight. They now retire at once.
    master = start_master(app=SOAK_APP, workers=WORKERS)
    master.wait_workers(WORKERS)
    operator = _Operator(master)
    running = load(master, clients=SIGNAL_SOAK_CLIENTS, line=b"slow")
    running.wait_requests(50)
    deadline = time.monotonic() + SIGNAL_SOAK_SECONDS
    for signum in itertools.cycle(SIGNAL_CYCLE):
        if time.monotonic() >= deadline:
            break
        operator.send(signum)
    running.wait_requests(50)  # and the last master serves
    running.stop()
    print(f"\nsignals: {dict(operator.sent)}; {running.ok} requests; masters: {operator.sent['SIGUSR2'] + 1}")
    assert set(operator.sent) == {"SIGHUP", "SIGUSR2", "SIGTTIN", "SIGTTOU"}
    assert running.failures == []
    assert "died unexpectedly" not in master.log()


# -- 2. recycling after every request --------------------------------------------------------

# Requests served with max_requests=1, and how many of them warm the master up first.
RECYCLING_REQUESTS = 5000
WARM_UP_REQUESTS = 500
# Workers recycled by the end, and during the warm-up. The master reads a worker's count at its
# ticks, so under this load a worker serves hundreds of requests past max_requests=1 and 5,000
# requests alone would recycle only a handful: the load runs until both counts are reached.
RECYCLES = 200
WARM_UP_RECYCLES = 20
# What the master may gain between the warm-up and the end: a descriptor or two (a log file
# reopened, a lazily made object), a few MB of RSS (the allocator keeps freed arenas).
FD_SLACK = 2
RSS_SLACK = 4 * 2**20
RECYCLED_LINE = "(max_requests 1)"


@dataclasses.dataclass(frozen=True)
class _Usage:
    fds: int
    rss: int


def test_max_requests_1_for_5000_requests_leaks_nothing_in_the_master(start_master, load):
    master = start_master(app=SOAK_APP, workers=WORKERS, max_requests=1)
    master.wait_workers(WORKERS)
    process = psutil.Process(master.pid)
    served = _serve(master, load, WARM_UP_REQUESTS, WARM_UP_RECYCLES)
    warm = _settled_usage(master, process)
    served += _serve(master, load, RECYCLING_REQUESTS - served, RECYCLES)
    end = _settled_usage(master, process)
    print(f"\nmax_requests=1: {served} requests, {master.log().count(RECYCLED_LINE)} workers recycled; "
          f"master fds {warm.fds} -> {end.fds}, RSS {warm.rss} -> {end.rss}")
    assert end.fds <= warm.fds + FD_SLACK
    assert end.rss <= warm.rss + RSS_SLACK


def _serve(master: Any, load: Any, requests: int, recycles: int) -> int:
    """Run the load until it made *requests* and *recycles* workers were recycled in all."""
    running = load(master, clients=CLIENTS)
    running.wait_requests(requests, timeout=STEP_TIMEOUT)
    wait_until(lambda: master.log().count(RECYCLED_LINE) >= recycles, STEP_TIMEOUT,
               message=f"recycled only {master.log().count(RECYCLED_LINE)} workers")
    running.stop()
    assert running.failures == []
    return running.ok


def _settled_usage(master: Any, process: psutil.Process) -> _Usage:
    """The master's descriptors and RSS once every worker is fresh and no child is a zombie."""
    def settled() -> bool:
        views = master.workers()
        fresh = len(views) == WORKERS and all(v.requests == 0 and v.state_name == "idle" for v in views)
        return fresh and not _zombies(process)
    wait_until(settled, STEP_TIMEOUT, message=f"not settled: requests per worker "
               f"{[v.requests for v in master.workers()]}, zombie children {_zombies(process)}")
    return _Usage(process.num_fds(), process.memory_info().rss)


def _zombies(process: psutil.Process) -> list[int]:
    zombies = []
    for child in process.children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            continue  # reaped meanwhile
    return zombies


# -- 3. out of file descriptors ----------------------------------------------------------------

# Connections the test keeps open: more than LOW_NOFILE, so the worker runs out of descriptors
# and the rest wait in the backlog; request threads are not the limit.
HELD_CONNECTIONS = 100
THREADS = 2 * HELD_CONNECTIONS
# How long the overload is watched: longer than one log interval, so a second line is due.
OVERLOAD_WINDOW = servers._RESOURCE_LOG_INTERVAL + 2.0
# A worker backing off uses a sliver of a core (0.3% measured); a busy loop uses all it can
# get, which on a shared 2-core machine was 35% of one.
MAX_CPU_SHARE = 0.1
EMFILE_LINE = "cannot take new requests"


def test_a_worker_out_of_descriptors_logs_rarely_does_not_spin_and_recovers(start_master):
    master = start_master(app=SOAK_APP, workers=1, mode="thread", threads=THREADS,
                          post_fork=f"{SOAK_APP}:low_nofile")
    (pid,) = master.wait_workers(1)
    worker = psutil.Process(pid)
    # Each held connection says a line and stays open: it holds a request thread. (Silent ones
    # would wait in the worker's poller, which keeps half the descriptors free.)
    with _held_connections(master.address(), HELD_CONNECTIONS, first=b"hold\n"):
        wait_until(lambda: EMFILE_LINE in master.log(), STEP_TIMEOUT,
                   message=f"no EMFILE logged:\n{master.log()}")
        cpu, wall = _cpu_over(worker, OVERLOAD_WINDOW)
        assert worker.num_fds() >= LOW_NOFILE  # still out of descriptors at the end
    lines = [line for line in master.log().splitlines() if EMFILE_LINE in line]
    print(f"\nEMFILE: {len(lines)} log lines, worker CPU {cpu:.2f} s over {wall:.1f} s: {lines}")
    assert "Too many open files" in lines[0]
    assert 2 <= len(lines) <= 3  # one per interval: at the start, after 5 s (and one to spare)
    assert _suppressed(lines[1]) <= _MAX_RETRIES_PER_INTERVAL  # retried at the back-off's pace
    assert cpu < MAX_CPU_SHARE * wall
    assert master.request(b"after") == b"after"  # the load dropped: served again
    assert master.worker_pids() == {pid}  # by the same worker, which never died


# Failed accepts one worker can make in a log interval when each is followed by the back-off
# (with room for a slow clock); a busy loop makes tens of thousands.
_MAX_RETRIES_PER_INTERVAL = int(1.5 * servers._RESOURCE_LOG_INTERVAL / servers._RESOURCE_BACKOFF)


def _suppressed(line: str) -> int:
    match = re.search(r"\((\d+) similar errors suppressed\)", line)
    assert match, line
    return int(match.group(1))


def _cpu_over(process: psutil.Process, seconds: float) -> tuple[float, float]:
    """CPU seconds *process* uses during the next *seconds* of wall time, and the wall time."""
    before, start = process.cpu_times(), time.monotonic()
    time.sleep(seconds)  # a measurement window, not a synchronisation: the load is held meanwhile
    after, wall = process.cpu_times(), time.monotonic() - start
    return after.user + after.system - before.user - before.system, wall


@contextlib.contextmanager
def _held_connections(address: Any, count: int, first: bytes = b"") -> Iterator[list[socket.socket]]:
    """Open *count* connections to *address*, each sending *first*, and keep them open for the block."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(address, timeout=SOCKET_TIMEOUT))
            socks[-1].sendall(first)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_the_drop_in_server_out_of_descriptors_keeps_serving(tmp_path):
    # The same fault without a master: serve_forever() of prefork.socketserver backs off too.
    # Its back-off once opened a descriptor of its own (an epoll) to wait on, so running out of
    # descriptors made serve_forever() raise EMFILE and the server was gone.
    errors = tmp_path / "stderr"
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.soak_dropin"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        with _held_connections(("127.0.0.1", port), HELD_CONNECTIONS):
            wait_until(lambda: EMFILE_LINE in errors.read_text(), STEP_TIMEOUT,
                       message=f"no EMFILE logged: {errors.read_text()}")
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
            sock.sendall(b"after\n")
            assert sock.makefile("rb").readline() == b"after\n", errors.read_text()
        assert proc.poll() is None, errors.read_text()
    finally:
        kill_process_group(proc.pid)
        proc.wait(SOCKET_TIMEOUT)
        proc.stdout.close()  # type: ignore[union-attr]


# -- 4. a handler that leaks memory --------------------------------------------------------------

# A worker whose RSS passes this is recycled; a fresh worker uses far less (about 25 MB).
MEMORY_LIMIT = 64 * 2**20
# What one leaking request keeps: four of them put a worker over the limit on their own.
LEAK_STEP = MEMORY_LIMIT // 4
# Bound on leaking requests: each worker holds at most four before it is over the limit.
MAX_LEAKS = 20


def test_a_leaking_worker_is_recycled_for_memory_without_a_failed_request(start_master, load):
    master = start_master(app=SOAK_APP, workers=WORKERS, max_worker_memory=MEMORY_LIMIT)
    master.wait_workers(WORKERS)
    running = load(master, clients=CLIENTS)
    running.wait_requests(50)
    leaker = _leak_until_over(master)
    wait_pid_gone(leaker, timeout=STEP_TIMEOUT)
    master.wait_workers(WORKERS)
    running.wait_requests(100)
    running.stop()
    print(f"\nleaking worker {leaker} recycled; workers now {master.worker_pids()}; {running.ok} requests")
    assert leaker not in master.worker_pids()
    assert running.failures == []
    assert "above max_worker_memory" in master.log()


def _leak_until_over(master: Any) -> int:
    """Send leaking requests until one worker holds MEMORY_LIMIT bytes; its pid."""
    for _ in range(MAX_LEAKS):
        pid, total = master.request(b"leak %d" % LEAK_STEP).split()
        if int(total) >= MEMORY_LIMIT:
            return int(pid)
    raise AssertionError(f"no worker reached {MEMORY_LIMIT} bytes in {MAX_LEAKS} requests")
