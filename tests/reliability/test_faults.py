"""Faults under load, against real masters: killed workers and masters, stuck and bad handlers.

Each test states the promise it checks (README "The master": Supervision, Signals) and injects
the fault with real signals while real clients keep asking; clients classify every failure, so
a lost connection (reset or closed without a reply) is told apart from a wrong reply, a
timeout or a refused connection, which no fault here may cause.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import select
import signal
import socket
import statistics
import threading
import time
from typing import Any, Callable

import psutil
import pytest

from prefork.errors import EXIT_OK
from prefork.pool import Pool, Spawn
from tests.integration.conftest import wait_pid_gone
from tests.support import SOCKET_TIMEOUT, heavy, pool_config, wait_until

pytestmark = pytest.mark.reliability

APP = "tests.reliability.faults_app"
# The kill storm: how long it lasts, and the pause between two kills (drawn at random).
STORM_SECONDS = 20.0
KILL_INTERVAL = (0.5, 1.0)
# How long a pool gets to be back to size after a worker died (a bound on a hang: the
# replacement is normally serving within milliseconds).
RECOVERY_TIMEOUT = 10.0
# The master's request timeout in the tests of stuck handlers, and its SIGABRT-to-SIGKILL grace
# (prefork.pool.ABORT_GRACE, restated: the test checks the promise, not the constant).
TIMEOUT = 2
ABORT_GRACE = 2.0
# CPU seconds a worker must burn after announcing a spin, to be surely in the spin loop.
SPIN_PROOF = 0.1
# Connections queued behind busy workers when TERM arrives, and the listen backlog they fill.
# Far more than two workers take in the turns before they see TERM (a turn serves up to 32
# queued connections, prefork.servers._READY_BATCH), so most are served by the stop's drain.
QUEUED = 200
# pidfd_getfd(2), Linux 5.6: the same number on every architecture (new system calls are
# numbered in common since 424); Python 3.11 has os.pidfd_open but no wrapper for this one.
_SYS_PIDFD_GETFD = 438
# Requests the load must complete after a fault, to show the service goes on.
PROGRESS = 20
# A client thread makes at most this many requests, whatever happens.
MAX_REQUESTS_PER_CLIENT = 1_000_000


# -- clients ------------------------------------------------------------------------------------


class Closed(ConnectionError):
    """The server closed the connection; *data* is what it sent before."""

    def __init__(self, data: bytes) -> None:
        super().__init__(f"closed after {data!r}")
        self.data = data


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise Closed(data)
        data += chunk
    return data[:-1]


def lost_connection(exc: BaseException) -> bool:
    """A connection its worker dropped: reset, or closed before any byte of the reply."""
    if isinstance(exc, Closed):
        return exc.data == b""
    return isinstance(exc, (ConnectionResetError, BrokenPipeError))


def expect_lost(sock: socket.socket) -> None:
    """The request on *sock* must end with its connection dropped, not with a reply."""
    with pytest.raises(OSError) as failure:
        read_line(sock)
    assert lost_connection(failure.value), repr(failure.value)


class EchoLoad:
    """Client threads, each making requests with unique lines and checking every echo.

    ``lost`` holds requests whose connection was dropped, and ``lost_ports`` their clients'
    ports; ``bad`` everything else that went wrong (a wrong or partial reply, a timeout, a
    refused connection).
    """

    def __init__(self, address: Any, clients: int) -> None:
        self.address = address
        self.ok = 0
        self.lost: list[str] = []
        self.lost_ports: list[int] = []
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"echo-load-{i}")
                         for i in range(clients)]

    def __enter__(self) -> EchoLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(SOCKET_TIMEOUT * 2)

    @property
    def failures(self) -> list[str]:
        return self.lost + self.bad

    def wait_ok(self, count: int, timeout: float = 30.0) -> None:
        start = self.ok
        wait_for(lambda: self.ok - start >= count, timeout,
                 lambda: f"load stalled at {self.ok}: {self.failures[:5]}")

    def _run(self, client: int) -> None:
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if self._stop.is_set():
                return
            line = b"client %d request %d" % (client, n)
            port = 0
            try:
                with socket.create_connection(self.address, timeout=SOCKET_TIMEOUT) as sock:
                    port = sock.getsockname()[1]
                    sock.sendall(line + b"\n")
                    reply = read_line(sock)
            except OSError as exc:
                with self._lock:
                    if lost_connection(exc):
                        self.lost.append(repr(exc))
                        self.lost_ports.append(port)
                    else:
                        self.bad.append(f"{exc!r} on {line!r}")
                continue
            with self._lock:
                if reply == line:
                    self.ok += 1
                else:
                    self.bad.append(f"wrong reply {reply!r} to {line!r}")


def hold_every_worker(master: Any, count: int) -> tuple[list[socket.socket], list[int]]:
    """Open *count* connections that each keep one sync worker busy; returns them and the pids.

    Each connection asks for the pid and stays open, so its worker waits for the next line and
    the next connection is taken by another worker: *count* connections, *count* workers.
    """
    socks: list[socket.socket] = []
    pids: list[int] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT))
            socks[-1].sendall(b"pid\n")
            pids.append(int(read_line(socks[-1])))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, pids


def wait_replaced(master: Any, size: int, gone: int) -> set[int]:
    """Wait until the pool has *size* ready workers again and *gone* is no longer among them."""
    def back() -> set[int] | None:
        ready, pids = master.pids_now()  # one reading: two could pair a stale slot with its successor
        return ready if gone not in pids and len(ready) == len(pids) == size else None
    return wait_for(back, RECOVERY_TIMEOUT,
                    lambda: f"pool not back to {size} workers without {gone}: {master.workers()}")


def wait_for(predicate: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> Any:
    """wait_until, with a failure message that tells the state at the deadline, not at the start."""
    value = wait_until(predicate, timeout, fail=False)
    assert value, describe()
    return value


def slot_of(master: Any, pid: int) -> Any:
    return next((view for view in master.workers() if view.pid == pid), None)


# -- 1. workers killed at random under load ------------------------------------------------------


@heavy
def test_a_storm_of_worker_kills_loses_only_the_requests_in_flight(start_master):
    """SIGKILL a random worker every 0.5-1 s for 20 s under load: the only requests that fail
    are those the victim had accepted (a sync worker holds one at a time), each with its
    connection dropped, never a wrong reply; the pool is back to size before the next kill.

    Each victim is stopped (SIGSTOP) a moment before its SIGKILL, to list the connections it
    holds: frozen, it can take no other, so those are exactly the requests the kill may lose.
    """
    master = start_master(app=APP, workers=3)
    master.wait_workers(3)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills, in_flight, recoveries = 0, [], []
    with EchoLoad(master.address(), clients=4) as load:
        load.wait_ok(PROGRESS)
        end = time.monotonic() + STORM_SECONDS
        while time.monotonic() < end:
            victim = rng.choice(sorted(master.ready_pids()))
            os.kill(victim, signal.SIGSTOP)
            wait_stopped(victim)
            held = client_ports(victim)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            kills += 1
            in_flight += held
            assert len(held) <= 1, f"a sync worker held {len(held)} connections"
            next_kill = killed_at + rng.uniform(*KILL_INTERVAL)
            wait_pid_gone(victim)
            wait_replaced(master, 3, gone=victim)
            recoveries.append(time.monotonic() - killed_at)
            load.wait_ok(PROGRESS)  # the pool that is back serves
            time.sleep(max(0.0, next_kill - time.monotonic()))  # pacing the storm, not a wait
    report = (f"seed {seed}: {load.ok} requests answered, {kills} kills, {len(in_flight)} requests "
              f"in flight at a kill, {len(load.lost)} connections lost, {len(load.bad)} other failures; "
              f"back to size after {statistics.median(recoveries) * 1000:.0f} ms (median), "
              f"{max(recoveries) * 1000:.0f} ms (max)")
    print(report)
    assert kills >= STORM_SECONDS / KILL_INTERVAL[1] / 2, report  # the storm did happen
    assert not load.bad, f"{report}: {load.bad[:10]}"
    assert set(load.lost_ports) <= set(in_flight), f"{report}: lost requests no victim held: {load.lost[:10]}"
    assert len(load.lost) <= kills, f"{report}: {load.lost[:10]}"
    assert "died unexpectedly (killed by SIGKILL)" in master.log()


def wait_stopped(pid: int) -> None:
    """Until the kernel has stopped *pid*. kill(SIGSTOP) returns before that: a process running
    on the other CPU goes on for a moment (a busy loop was still running right after kill()
    returned 300 times in 300), and a worker may accept a connection meanwhile, which the
    listing would miss and the SIGKILL then reset."""
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, SOCKET_TIMEOUT, interval=0.001,
               message=f"worker {pid} not stopped by SIGSTOP")


def client_ports(pid: int) -> list[int]:
    """The client ports of the TCP connections that the (stopped) process *pid* holds.

    Each of its sockets is copied into this process with pidfd_getfd(2) and asked for its peer
    (the listener has none); the copy is closed at once. Not psutil.net_connections(): it parses
    all of /proc/net/tcp, which the TIME_WAIT entries of a load make take most of a second,
    long enough to change the fault (the victim stays stopped meanwhile).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    ports = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue  # the descriptor that listed the directory, gone already
            copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if copy < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
            with socket.socket(fileno=copy) as sock:
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    try:
                        ports.append(sock.getpeername()[1])
                    except OSError as exc:
                        if exc.errno != errno.ENOTCONN:  # the listener: no peer
                            raise
    finally:
        os.close(pidfd)
    return ports


# Enough kills in a row that the crash back-off for young workers (0.1 s doubling: 12.8 s before
# the 8th restart) would outlast RECOVERY_TIMEOUT if it applied to workers that had served.
YOUNG_KILLS = 8


def test_young_workers_that_served_are_replaced_without_back_off(start_master):
    """Kill a worker a moment after it started but once it has served, again and again (a
    poison request, the OOM killer): each is replaced at once; the back-off is for workers that
    die without serving (the crash loop), which would otherwise leave the pool short."""
    master = start_master(app=APP, workers=1)
    (pid,) = master.wait_workers(1)
    for _ in range(YOUNG_KILLS):
        assert int(master.request(b"pid")) == pid
        wait_until(lambda: getattr(slot_of(master, pid), "requests", 0) >= 1, message=str(master.workers()))
        os.kill(pid, signal.SIGKILL)
        (pid,) = wait_replaced(master, 1, gone=pid)
    assert master.request(b"still serving") == b"still serving"


def test_the_back_off_counts_young_deaths_that_served_nothing():
    """The same rule in the pool policy alone: a young worker that served is replaced at once,
    one that served nothing (a crash loop) only after the back-off."""
    pool = Pool(pool_config(), capacity=4)
    (first,) = pool.start(now=0.0)
    pool.spawned(first.worker, 100)
    (second,) = pool.exited(100, -signal.SIGKILL, now=1.0, served=5)
    assert isinstance(second, Spawn)
    pool.spawned(second.worker, 101)
    assert pool.exited(101, -signal.SIGKILL, now=2.0, served=0) == []
    assert any(isinstance(action, Spawn) for action in pool.tick(now=3.0, slots={}))


# -- 2. a stopped worker and the request timeout -------------------------------------------------


def test_a_worker_stopped_mid_request_is_aborted_after_timeout_with_its_traceback(start_master):
    """SIGSTOP a busy worker: after `timeout` it gets SIGABRT and SIGCONT, dumps its stack to
    the error log and dies of SIGABRT; the master logs the request (client, listener, age); a
    replacement serves."""
    master = start_master(app=APP, workers=1, timeout=TIMEOUT)
    (pid,) = master.wait_workers(1)
    listener = master.info["listeners"][0]
    with socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT) as sock:
        client = "%s:%d" % sock.getsockname()[:2]
        sent = time.monotonic()
        sock.sendall(b"announce spin 60\n")
        assert read_line(sock) == b"started"
        assert slot_of(master, pid).client == client
        wait_spinning(pid)
        os.kill(pid, signal.SIGSTOP)
        wait_pid_gone(pid, timeout=TIMEOUT + ABORT_GRACE + RECOVERY_TIMEOUT)
        assert time.monotonic() - sent >= TIMEOUT, "killed before its timeout"
        expect_lost(sock)
    (new,) = wait_replaced(master, 1, gone=pid)
    assert int(master.request(b"pid")) == new
    log = master.log()
    logged = re.search(rf"sending SIGABRT to worker 1 \(pid {pid}\): request from {re.escape(client)} "
                       rf"on {re.escape(listener)} running for ([0-9.]+)s \(timeout\)", log)
    assert logged, f"the request was not logged with its client and listener:\n{log}"
    assert float(logged.group(1)) >= TIMEOUT
    # faulthandler's dump: every thread, innermost call first, down to the handler's loop.
    assert "Fatal Python error: Aborted" in log and "most recent call first" in log, log
    assert re.search(r'File ".*faults_app\.py", line \d+ in answer', log), log
    # Dead of the SIGABRT itself: the SIGCONT let the stopped worker run and dump its stack
    # (without it, only the SIGKILL 2 s later would end it, with nothing dumped).
    assert f"worker 1 (pid {pid}) died unexpectedly (killed by SIGABRT)" in log, log


def wait_spinning(pid: int) -> None:
    """Wait until *pid* burns CPU: past the reply it sent, it is in the spin loop."""
    process = psutil.Process(pid)
    start = process.cpu_times().user
    wait_until(lambda: process.cpu_times().user - start >= SPIN_PROOF, message=f"worker {pid} does not spin")


# -- 3. the master killed ------------------------------------------------------------------------


def test_no_worker_outlives_a_killed_master_and_the_port_is_freed(start_master):
    """SIGKILL the master with one worker busy and one idle: within 1 s both are gone
    (PR_SET_PDEATHSIG), the client's connection is dropped, and the port binds again."""
    master = start_master(app=APP, workers=2)
    pids = master.wait_workers(2)
    address = master.address()
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(b"announce spin 60\n")
        assert read_line(sock) == b"started"
        wait_until(lambda: sorted(v.state_name for v in master.workers()) == ["busy", "idle"],
                   message="expected one busy and one idle worker")
        master.proc.kill()
        master.proc.wait(SOCKET_TIMEOUT)
        wait_for(lambda: not alive(pids), 1.0, lambda: f"workers outlived their master: {alive(pids)}")
        expect_lost(sock)
    assert_port_free(address)


def test_idle_workers_leave_by_their_parent_check_without_pdeathsig(start_master):
    """The fallback where PR_SET_PDEATHSIG is missing: an idle worker checks its parent on every
    turn of its loop (at least once a second) and leaves when the master is gone."""
    master = start_master(app=APP, workers=2, post_fork=f"{APP}:no_pdeathsig")
    pids = master.wait_workers(2)
    address = master.address()
    master.proc.kill()
    master.proc.wait(SOCKET_TIMEOUT)
    wait_for(lambda: not alive(pids), RECOVERY_TIMEOUT, lambda: f"workers outlived their master: {alive(pids)}")
    wait_until(lambda: master.log().count("is gone, leaving") == 2, message=master.log())
    assert_port_free(address)


def alive(pids: set[int]) -> list[int]:
    """Those of *pids* that still run (zombies are dead)."""
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [pid for pid in pids if running(pid)]


def assert_port_free(address: Any) -> None:
    """Nobody listens on *address* any more: a plain server socket binds it (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every server does
        sock.bind(address)
        sock.listen()


# -- 4. TERM with a full backlog -----------------------------------------------------------------


def test_term_answers_every_connection_queued_behind_busy_workers(start_master):
    """Both workers busy, the listen backlog full of connections, then TERM: the busy requests
    go on, every queued connection gets its echo (none is reset), and the master exits 0."""
    master = start_master(app=APP, workers=2, backlog=QUEUED)
    workers = master.wait_workers(2)
    holders, held = hold_every_worker(master, 2)
    queued: list[socket.socket] = []
    try:
        assert set(held) == workers
        for n in range(QUEUED):  # connect() returns once the kernel queued the connection
            queued.append(socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT))
            queued[-1].sendall(b"queued %d\n" % n)
            queued[-1].shutdown(socket.SHUT_WR)  # one line: its handler ends without waiting for us
        assert not readable(queued), "a queued connection was served early"
        master.signal(signal.SIGTERM)
        wait_until(lambda: master.log().count("stopping worker") == 2, message=master.log())
        for sock in holders:  # the requests in flight go on after TERM
            sock.sendall(b"after TERM\n")
            assert read_line(sock) == b"after TERM"
            sock.close()
        answers = [read_line(sock) for sock in queued]
    finally:
        for sock in holders + queued:
            sock.close()
    assert answers == [b"queued %d" % n for n in range(QUEUED)]
    assert master.wait_exit() == EXIT_OK


def test_term_under_steady_load_ends_without_waiting_for_new_arrivals(start_master):
    """TERM while clients keep connecting: the workers serve what was queued when the stop
    began and leave, long before graceful_timeout; nothing is SIGKILLed and no reply is wrong
    (later clients find the port closed, or their queued connection reset)."""
    master = start_master(app=APP, workers=2, graceful_timeout=60)
    master.wait_workers(2)
    with EchoLoad(master.address(), clients=8) as load:
        load.wait_ok(200)
        master.signal(signal.SIGTERM)
        code = master.wait_exit(timeout=20)  # a third of graceful_timeout: the stop did not wait it out
    assert code == EXIT_OK
    log = master.log()
    assert "SIGKILL" not in log, log
    wrong = [failure for failure in load.bad if "ConnectionRefusedError" not in failure]
    assert not wrong, wrong[:5]


def test_a_fast_stop_does_not_wait_behind_queued_connections(start_master):
    """One worker with many slow connections queued, then INT: the worker leaves after the
    request it is on (a turn that takes queued connections in a batch stops at a pending
    signal), well before the master's SIGKILL; the connections it did not take are closed."""
    slow, count = 0.3, 40  # 12 s of queued work: far beyond the fast stop's 2 s grace
    master = start_master(app=APP, workers=1, backlog=count)
    (worker,) = master.wait_workers(1)
    queued = []
    try:
        for _ in range(count):
            queued.append(socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT))
            queued[-1].sendall(b"sleep %.1f\n" % slow)
            queued[-1].shutdown(socket.SHUT_WR)  # one line: its handler ends after the reply
        wait_until(lambda: slot_of(master, worker).state_name == "busy", message=master.log())
        master.signal(signal.SIGINT)
        assert master.wait_exit() == EXIT_OK
    finally:
        for sock in queued:
            sock.close()
    log = master.log()
    assert "killed by SIGKILL" not in log and "SIGKILL to worker" not in log, log


def readable(socks: list[socket.socket]) -> list[int]:
    """The descriptors among *socks* that have something to read, now."""
    poller = select.poll()  # not select(): descriptors can be above FD_SETSIZE
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return [fd for fd, _ in poller.poll(0)]


# -- 5. handlers that misbehave ------------------------------------------------------------------

# What each bad command does to its worker, and what the master's log must then say.
BAD_HANDLERS = {
    "block": ("replaced", ["(timeout)", "died unexpectedly (killed by SIGABRT)"]),
    "block-masked": ("replaced", ["(timeout)", "SIGKILL to worker", "did not exit after SIGABRT",
                                  "died unexpectedly (killed by SIGKILL)"]),
    "_exit": ("replaced", ["died unexpectedly (exit status 4)"]),
    "exit": ("replaced", ["died unexpectedly (exit status 3)"]),
    "raise": ("same", ["Exception occurred during processing of request from", "Traceback",
                       "RuntimeError: the handler failed on purpose"]),
}


@pytest.mark.parametrize("command", list(BAD_HANDLERS))
def test_a_misbehaving_handler_leaves_the_rest_of_the_service_unaffected(start_master, command):
    """A handler that blocks for ever (timeout set, also with SIGABRT blocked), calls os._exit
    or sys.exit, or raises: a concurrent load on the other workers sees no failure, the pool
    returns to size; after a raise the error is logged and the same worker serves on."""
    fate, log_lines = BAD_HANDLERS[command]
    master = start_master(app=APP, workers=3, timeout=TIMEOUT)
    workers = master.wait_workers(3)
    with EchoLoad(master.address(), clients=2) as load:
        load.wait_ok(PROGRESS)
        with socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT) as sock:
            client = sock.getsockname()[:2]
            sock.sendall(b"pid\n")
            bad = int(read_line(sock))
            sock.sendall(command.encode() + b"\n")
            expect_lost(sock)
        if fate == "replaced":
            wait_pid_gone(bad, timeout=TIMEOUT + ABORT_GRACE + RECOVERY_TIMEOUT)
            wait_replaced(master, 3, gone=bad)
        load.wait_ok(PROGRESS)
    assert load.ok and not load.failures, load.failures[:10]
    log = master.log()
    for line in log_lines:
        assert line in log, f"{line!r} not in the log:\n{log}"
    if fate == "same":
        assert f"processing of request from {client}" in log, "the error does not name its client"
        holders, serving = hold_every_worker(master, 3)
        for sock in holders:
            sock.close()
        assert set(serving) == workers, "the worker whose handler raised does not serve"
    else:
        assert bad not in master.worker_pids() and len(master.wait_workers(3)) == 3
