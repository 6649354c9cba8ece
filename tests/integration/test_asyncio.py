"""mode = "asyncio" (issue 15): event-loop workers under the same master, in real processes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from prefork.errors import EXIT_APP_LOAD, EXIT_OK, EXIT_USAGE
from prefork.master import DESCRIPTOR_CEILING
from prefork.scoreboard import Health, MasterView, Scoreboard, SlotView
from tests.integration.conftest import _read_line, wait_pid_gone
from tests.support import SOCKET_TIMEOUT, datagram_request, heavy, require_tool, stream_request, wait_until

pytestmark = pytest.mark.integration

AIO_APPS = "tests.integration.aio_apps"


def connect(address: object) -> socket.socket:
    return socket.create_connection(address, timeout=SOCKET_TIMEOUT)  # type: ignore[arg-type]


def ask(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\n")
    return _read_line(sock)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_echo_serves_every_kind_of_listener_in_asyncio_mode(start_master, sock_dir: Path, loop: str) -> None:
    stream, datagrams = sock_dir / "s", sock_dir / "d"
    master = start_master(app="workers.echo", mode="asyncio", loop=loop,
                          bind=["tcp://127.0.0.1:0", "udp://127.0.0.1:0", f"unix:{stream}", f"unix-dgram:{datagrams}"])
    assert master.request(b"hello") == b"hello"
    assert datagram_request(master.address(1), b"ping") == b"ping"
    assert stream_request(str(stream), b"one\ntwo", socket.AF_UNIX) == b"one\ntwo"
    assert datagram_request(str(datagrams), b"dgram", socket.AF_UNIX, bind=str(sock_dir / "c")) == b"dgram"
    long_line = bytes(range(1, 251)) * 1000 + b"\n"  # 250 kB: several MAX_LINE pieces
    assert stream_request(master.address(0), long_line) == long_line


@pytest.mark.parametrize("loop, expected", [("uvloop", b"uvloop"), ("asyncio", b"asyncio")])
def test_the_class_form_gets_reader_writer_and_server_on_the_chosen_loop(start_master, loop: str,
                                                                        expected: bytes) -> None:
    master = start_master(app=f"{AIO_APPS}:handlers", mode="asyncio", workers=1, loop=loop)
    with connect(master.address()) as sock:
        pid, listener = _read_line(sock).split()
        assert listener.decode() == master.info["listeners"][0]
        assert ask(sock, b"pid") == pid
        assert ask(sock, b"loop") == expected


def test_a_failing_handler_is_logged_its_connection_closed_and_the_worker_goes_on(start_master) -> None:
    master = start_master(app=AIO_APPS, mode="asyncio", workers=1)
    with connect(master.address()) as sock:
        pid = ask(sock, b"pid")
        sock.sendall(b"raise\n")
        assert sock.recv(100) == b""  # closed
    wait_until(lambda: "RuntimeError: the handler failed on purpose" in master.log(), 10)
    assert "Traceback" in master.log()
    assert master.request(b"pid") == pid


def test_a_protocol_class_serves_each_connection_and_a_failing_one_is_closed(start_master) -> None:
    master = start_master(app=f"{AIO_APPS}:protocols", mode="asyncio", workers=1)
    with connect(master.address()) as sock:
        assert ask(sock, b"echo") == b"echo"
        sock.sendall(b"raise\n")
        assert sock.recv(100) == b""
    assert master.request(b"again") == b"again"
    wait_until(lambda: "RuntimeError: the protocol failed on purpose" in master.log(), 10)
    wait_until(lambda: master.workers()[0].requests == 2, 5, message=str(master.workers()))


def test_a_synchronous_handler_is_refused_in_asyncio_mode(start_master) -> None:
    master = start_master(app="tests.integration.apps", mode="asyncio", ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "has no AsyncStreamHandler" in master.log()
    assert "StreamHandler is a synchronous handler" in master.log()


def test_an_asyncio_handler_is_refused_in_sync_mode(start_master) -> None:
    master = start_master(app=f"{AIO_APPS}:AsyncStreamHandler", mode="sync", ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "is an asyncio stream handler; serve it with mode asyncio" in master.log()


def test_a_tls_listener_without_its_certificate_is_refused_in_asyncio_mode_not_served_in_plaintext(start_master) -> None:
    """?tls and ?proxy are served in this mode (tests/integration/test_tls.py, test_asyncio_tls.py);
    a ?tls listener without a certfile is refused as in the others."""
    master = start_master(app=AIO_APPS, mode="asyncio", bind=["tcp://127.0.0.1:0?proxy&tls"], ready=False)
    assert master.wait_exit() == EXIT_USAGE
    assert "has ?tls, so set certfile" in master.log()


# -- the same promises as synchronous mode -------------------------------------------------------


def test_term_serves_the_backlog_lets_open_connections_finish_then_cancels_the_rest(start_master) -> None:
    master = start_master(app=AIO_APPS, mode="asyncio", workers=1, graceful_timeout=4,
                          bind=["tcp://127.0.0.1:0", "udp://127.0.0.1:0"])
    port = master.address()[1]
    with connect(master.address()) as idle, connect(master.address()) as stuck, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram, \
            concurrent.futures.ThreadPoolExecutor(9) as pool:
        datagram.settimeout(SOCKET_TIMEOUT)
        ask(idle, b"ready?")
        stuck.sendall(b"wait 30\n")  # still running at the deadline: cancelled
        blocking = pool.submit(master.request, b"block 3")  # holds the loop: the next ones queue
        wait_until(lambda: time.monotonic() - master.workers()[0].last_tick > 0.4, 10)
        queued = [pool.submit(master.request, b"queued %d" % i) for i in range(8)]
        wait_until(lambda: accept_queue(port) == 8, 5)
        stopped = time.monotonic()
        master.signal(signal.SIGTERM)
        datagram.sendto(b"wait 0.3", master.address(1))  # read at the stop, answered after it
        assert blocking.result() == b"blocked"
        assert sorted(f.result() for f in queued) == sorted(b"queued %d" % i for i in range(8))
        assert ask(idle, b"still here") == b"still here"  # an open connection may finish
        assert datagram.recv(100) == b"waited"
        assert stuck.recv(100) == b""  # cancelled shortly before graceful_timeout
        assert 3.0 < time.monotonic() - stopped < 5.5  # cancelled at graceful_timeout - 0.5 s
    assert master.wait_exit() == EXIT_OK
    assert "cancelled 2 handlers" in master.log() and "SIGKILL" not in master.log(), master.log()


def target_of(master) -> int:
    """The pool size the master aims at, from its scoreboard."""
    return master_view(master).target


def master_view(master) -> MasterView:
    """What the master publishes in its scoreboard."""
    return master.from_scoreboard(Scoreboard.master)


def accept_queue(port: int) -> int:
    """How many connections wait in the accept queue of the TCP listener on *port* (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
            return int(fields[4].rpartition(":")[2], 16)  # rx_queue of a listener: its queue
    return 0


def test_hup_ttin_ttou_and_recycling_under_load_fail_no_request(start_master, load) -> None:
    # max_requests counts connections: 3 clients make a connection per request (about 1,000 a
    # second on loopback), so workers are recycled all along.
    master = start_master(app=AIO_APPS, mode="asyncio", workers=2, max_requests=300)
    first = master.wait_workers(2, generation=1)
    running = load(master, clients=3)
    wait_until(lambda: first - master.worker_pids(), 30, message=f"not recycled: {master.workers()}")
    # Workers recycle all along: the pool's size is read from its target, not from a moment
    # when exactly that many workers run.
    master.signal(signal.SIGHUP)
    wait_until(lambda: len(master.ready_pids(generation=2)) >= 2, 10, message=str(master.workers()))
    for signum, size in ((signal.SIGTTIN, 3), (signal.SIGTTOU, 2)):
        master.signal(signum)
        wait_until(lambda: target_of(master) == size and len(master.ready_pids()) >= size, 10,
                   message=str(master.workers()))
    running.wait_requests(30)
    running.stop()
    assert running.failures == []
    assert "max_requests 300" in master.log()


# USR2 under load: tests/integration/test_master.py::test_usr2_upgrades_in_place_under_load[asyncio].


def test_the_scoreboard_shows_connections_requests_and_busy_state(start_master) -> None:
    master = start_master(app=AIO_APPS, mode="asyncio", workers=1)
    sockets = [connect(master.address()) for _ in range(3)]
    try:
        for sock in sockets:
            ask(sock, b"hi")
        wait_until(lambda: (master.workers()[0].active, master.workers()[0].state_name) == (3, "busy"), 5,
                   message=str(master.workers()))
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: (master.workers()[0].active, master.workers()[0].state_name, master.workers()[0].requests)
               == (0, "idle", 3), 5, message=str(master.workers()))


# The coroutine handlers, and the Protocols: these count bytes only where something reads them
# (here the access log), through a transport of prefork's in place of the loop's.
HANDLER_KINDS = pytest.mark.parametrize("app", [AIO_APPS, f"{AIO_APPS}:protocols"], ids=["coroutines", "protocols"])


@HANDLER_KINDS
def test_a_failing_datagram_handler_is_logged_with_its_traceback_and_the_worker_goes_on(start_master,
                                                                                       app: str) -> None:
    master = start_master(app=app, mode="asyncio", workers=1, bind=["udp://127.0.0.1:0"])
    (pid,) = master.wait_workers(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"raise", master.address())  # unanswered
    wait_until(lambda: "datagram handler failed on udp://127.0.0.1:" in master.log(), 10, message=master.log())
    assert "Traceback" in master.log() and "failed on purpose" in master.log(), master.log()
    assert datagram_request(master.address(), b"after") == b"after"
    assert master.worker_pids() == {pid}
    wait_until(lambda: master.workers()[0].requests == 2, 5, message=str(master.workers()))  # both counted


@HANDLER_KINDS
def test_allow_lists_and_the_access_log(start_master, tmp_path: Path, app: str) -> None:
    access = tmp_path / "access.log"
    master = start_master(app=app, mode="asyncio", workers=1, access_log=str(access),
                          bind=["tcp://127.0.0.1:0", "tcp://127.0.0.1:0?allow=10.0.0.0/8", "udp://127.0.0.1:0"])
    assert master.request(b"one") == b"one"
    with connect(master.address(1)) as refused:
        assert refused.recv(100) == b""  # closed unanswered
    assert datagram_request(master.address(2), b"three") == b"three"
    lines = lambda: access.read_text().splitlines() if access.exists() else []  # noqa: E731
    wait_until(lambda: len(lines()) == 3, 5, message=str(lines()))
    outcomes = sorted(line.split()[-1] for line in lines())
    assert outcomes == ["ok", "ok", "refused"], lines()
    assert any("in=4 out=4 ok" in line for line in lines()) and any("in=5 out=5 ok" in line for line in lines())
    # The latency histograms count what the access log says was served: the refusal is no request.
    assert [histogram.count for histogram in latency_of(master)[:3]] == [1, 0, 1]


def latency_of(master) -> list:
    """The latency histograms per listener counter, from the master's scoreboard."""
    return master.from_scoreboard(Scoreboard.latency)


# -- the blocked-loop watchdog and the idle timeout -------------------------------------------------


def test_a_blocked_loop_is_reported_with_its_task_then_aborted_and_replaced(start_master) -> None:
    master = start_master(app=AIO_APPS, mode="asyncio", workers=1, timeout=1.5)
    (pid,) = master.wait_workers(1)
    with connect(master.address()) as sock:
        sock.sendall(b"block 30\n")
        wait_pid_gone(pid, timeout=15)
        assert sock.recv(100) == b""
    wait_until(lambda: master.ready_pids() - {pid}, message=str(master.workers()))
    log = master.log()
    assert "the event loop has not turned for" in log and "in handler tests.integration.aio_apps.AsyncStreamHandler" in log, log
    assert "SIGABRT" in log and "(timeout)" in log and "request from 127.0.0.1:" in log
    assert 'File "' in log and "answer_async" in log, "the worker's stack was not dumped"
    assert master.request(b"ok") == b"ok"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_loop_blocked_while_idle_is_reported_aborted_and_replaced(start_master, loop: str) -> None:
    """No connection open, no handler running: a callback blocks the loop (issue 15)."""
    master = start_master(app=f"{AIO_APPS}:block_later", mode="asyncio", loop=loop, workers=1, timeout=1.5,
                          bind=["udp://127.0.0.1:0"])
    (pid,) = master.wait_workers(1)
    assert datagram_request(master.address(), b"block 3600") == b"scheduled"
    blocked = wait_until(lambda: stalled_slot(master, pid, 0.5), 10, message=str(master.workers()))
    assert (blocked.state_name, blocked.active) == ("idle", 0), blocked  # what the request timeout never looked at
    wait_pid_gone(pid, timeout=15)
    wait_until(lambda: master.ready_pids() - {pid}, message=str(master.workers()))
    log = master.log()
    assert "the event loop has not turned for" in log and "a callback, not a task, client - on -" in log, log
    assert re.search(rf"sending SIGABRT to worker 1 \(pid {pid}\): the event loop has not turned for [\d.]+s, "
                     r"blocked outside any connection's handler, by a callback or a task the worker's log names "
                     r"\(timeout\)", log), log
    assert "Fatal Python error: Aborted" in log and "Current thread" in log, "no stack dump at SIGABRT"
    assert datagram_request(master.address(), b"ping") == b"ping"


def _health(master) -> Health:
    health = master_view(master).health
    assert health is not None
    return health


def stalled_slot(master, pid: int, stalled: float) -> SlotView | None:
    """The slot of worker *pid* once its loop has not turned for *stalled* seconds."""
    now = time.monotonic()
    return next((v for v in master.workers() if v.pid == pid and v.event_loop and v.loop_stalled(now) > stalled), None)


def test_an_idle_loop_keeps_turning_and_outlives_timeout(start_master) -> None:
    timeout = 2.0  # eight ticks: a loop descheduled on a loaded machine is not mistaken for a blocked one
    master = start_master(app=AIO_APPS, mode="asyncio", workers=1, timeout=timeout,
                          bind=["tcp://127.0.0.1:0", "udp://127.0.0.1:0"])
    (pid,) = master.wait_workers(1)
    assert master.request(b"hello") == b"hello"
    idle_since = time.monotonic()
    # The master looks at the slots at least once a second: once it has looked at an idle worker
    # two timeouts later, any verdict on it is in.
    wait_until(lambda: _health(master).tick > idle_since + 2 * timeout, 20)
    (view,) = master.workers()
    assert (view.pid, view.state_name, view.event_loop) == (pid, "idle", True)
    assert "SIGABRT" not in master.log() and "has not turned" not in master.log(), master.log()
    assert master.request(b"still here") == b"still here"


@HANDLER_KINDS
def test_idle_connections_are_closed_after_idle_timeout(start_master, app: str) -> None:
    master = start_master(app=app, mode="asyncio", workers=1, idle_timeout=0.5)
    with connect(master.address()) as quiet, connect(master.address()) as talking:
        started = time.monotonic()
        ask(quiet, b"hello")
        while time.monotonic() - started < 1.5:
            ask(talking, b"wait 0.1")  # busy both ways: kept (the Protocol echoes it at once)
        assert quiet.recv(100) == b""
        assert ask(talking, b"still") == b"still"
    assert "idle for 0.5s (idle_timeout)" in master.log()


@HANDLER_KINDS
def test_an_idle_connection_whose_peer_does_not_read_is_aborted_not_held(start_master, app: str) -> None:
    """What the worker has to send waits for the peer, and nothing moves: a close() would wait
    for that flush forever, so the idle timeout aborts the connection."""
    master = start_master(app=app, mode="asyncio", workers=1, idle_timeout=0.5)
    with connect(master.address()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        line = b"x" * 1023 + b"\n"
        sent = 0
        sock.settimeout(0.1)
        # Until both sides' buffers are full (or the abort's reset comes while sendall() waits).
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while sent < 64 * 1024 * 1024:
                sock.sendall(line * 64)
                sent += len(line) * 64
        wait_until(lambda: master.workers()[0].active == 0, 10, message=str(master.workers()))
    assert "idle for 0.5s (idle_timeout)" in master.log()
    assert master.request(b"again") == b"again"


# -- many idle connections -------------------------------------------------------------------------

IDLE_CONNECTIONS = 2000


@heavy  # 2,000 connections opened as fast as the machine allows
def test_two_workers_hold_2000_idle_connections_while_an_active_client_is_answered(start_master, record_property):
    """Memory per idle connection, reported (USS of both workers, before and after), not timed."""
    _allow_descriptors(IDLE_CONNECTIONS + 100)
    master = start_master(app="workers.echo", mode="asyncio", workers=2)
    pids = master.wait_workers(2)
    warm = [connect(master.address()) for _ in range(20)]  # the first connections' allocations
    wait_until(lambda: sum(v.active for v in master.workers()) == len(warm), 10)
    before = sum(psutil.Process(pid).memory_full_info().uss for pid in pids)
    idle = [connect(master.address()) for _ in range(IDLE_CONNECTIONS)]
    try:
        wait_until(lambda: sum(v.active for v in master.workers()) == len(warm) + IDLE_CONNECTIONS, 20,
                   message=str(master.workers()))
        after = sum(psutil.Process(pid).memory_full_info().uss for pid in pids)
        latencies = []
        with connect(master.address()) as active:
            for _ in range(50):
                started = time.perf_counter()
                assert ask(active, b"still answered") == b"still answered"
                latencies.append(time.perf_counter() - started)
    finally:
        for sock in idle + warm:
            sock.close()
    per_connection = (after - before) / IDLE_CONNECTIONS
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
    record_property("bytes_per_idle_connection", per_connection)
    print(f"\n{IDLE_CONNECTIONS} idle connections on 2 workers: {per_connection / 1024:.1f} KiB each (USS); "
          f"active client p99 {p99 * 1000:.2f} ms")
    assert per_connection < 64 * 1024, "far above the 10 KiB target: something is held per connection"


# The soft limit of open files the masters of the descriptor tests start with, and the idle
# connections one asyncio worker then holds: more than that limit would allow.
LOWERED_SOFT_LIMIT = 256
BEYOND_LOWERED_LIMIT = 600


def _lower_soft_limit() -> None:
    """preexec_fn of the master's Popen: its soft limit of open files is LOWERED_SOFT_LIMIT, the hard one stays."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOWERED_SOFT_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def soft_open_files(pid: int) -> int:
    """The soft "Max open files" of process *pid*, as /proc/PID/limits shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_asyncio_mode_raises_the_descriptor_limit_so_a_worker_holds_more_connections_than_it_allowed(start_master):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    raised = DESCRIPTOR_CEILING if hard == resource.RLIM_INFINITY else hard
    if raised <= BEYOND_LOWERED_LIMIT + 100:
        pytest.skip(f"the hard limit of open files ({hard}) leaves nothing to raise to")
    _allow_descriptors(BEYOND_LOWERED_LIMIT + 100)  # this test process's own client sockets
    master = start_master(app="workers.echo", mode="asyncio", workers=1, preexec_fn=_lower_soft_limit)
    (pid,) = master.wait_workers(1)
    assert (f"mode asyncio: raised the open files limit (RLIMIT_NOFILE) from {LOWERED_SOFT_LIMIT} to {raised}"
            in master.log()), master.log()
    assert soft_open_files(master.pid) == soft_open_files(pid) == raised
    idle = []
    try:
        for _ in range(BEYOND_LOWERED_LIMIT):
            idle.append(connect(master.address()))
        wait_until(lambda: master.workers()[0].active == BEYOND_LOWERED_LIMIT, 20, message=str(master.workers()))
        with connect(master.address()) as active:
            assert ask(active, b"still answered") == b"still answered"
        assert master.worker_pids() == {pid} and "Too many open files" not in master.log()
    finally:
        for sock in idle:
            sock.close()


def test_sync_mode_leaves_the_descriptor_limit_as_the_master_started_with(start_master):
    master = start_master(app="workers.echo", mode="sync", workers=1, preexec_fn=_lower_soft_limit)
    (pid,) = master.wait_workers(1)
    assert soft_open_files(master.pid) == soft_open_files(pid) == LOWERED_SOFT_LIMIT
    assert "RLIMIT_NOFILE" not in master.log() and master.request(b"hello") == b"hello"


def _allow_descriptors(count: int) -> None:
    """This test process opens *count* sockets: raise its soft limit (up to the hard one) if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"the open files limit ({hard}) is below {count}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


WORKER_FILES = 128  # the open files limit, soft and hard, of the master (and so its workers) below
OUT_OF_FILES = re.compile(r"worker \d+: (cannot take new connections: Too many open files|\d+ of its 128 open files "
                          r"in use \(RLIMIT_NOFILE\): new connections are refused) \(\d+ similar reports suppressed\)")


def _lower_both_limits() -> None:
    """preexec_fn of the master's Popen: WORKER_FILES open files at most, so nothing can raise it."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (WORKER_FILES, WORKER_FILES))


@pytest.mark.parametrize("loop, query", [("asyncio", ""), ("uvloop", ""), ("uvloop", "?proxy")],
                         ids=["asyncio", "uvloop", "uvloop-proxy"])
def test_a_worker_out_of_descriptors_says_so_in_one_line_and_serves_again_once_some_close(start_master, loop, query):
    """asyncio's loop logs a traceback per failed accept(), uvloop closes what it cannot take in
    silence, a ?proxy listener's connections are accepted by the worker itself: each way, the
    log gets one line, and the worker goes on."""
    clients = 2 * WORKER_FILES
    _allow_descriptors(clients + 100)
    master = start_master(app="workers.echo", mode="asyncio", loop=loop, workers=1, preexec_fn=_lower_both_limits,
                          bind=[f"tcp://127.0.0.1:0{query}"])
    (pid,) = master.wait_workers(1)
    assert soft_open_files(pid) == WORKER_FILES
    idle = []
    try:
        for _ in range(clients):
            idle.append(connect(master.address()))  # the kernel completes them; the worker takes what it can
        wait_until(lambda: OUT_OF_FILES.search(master.log()), 15, message=master.log())
        if not query:  # (a ?proxy listener's connections count as active once past their stages)
            wait_until(lambda: master.workers()[0].active > WORKER_FILES // 2, 15, message=str(master.workers()))
            assert master.workers()[0].active < WORKER_FILES
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: master.workers()[0].active == 0, 15, message=str(master.workers()))
    with connect(master.address()) as active:
        if query:
            active.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 4711 80\r\n")
        assert ask(active, b"served again") == b"served again"
    log = master.log()
    assert master.worker_pids() == {pid}
    assert len(OUT_OF_FILES.findall(log)) <= 3, log  # one per RESOURCE_REPORT_INTERVAL (5 s)
    assert "accept on" not in log, log
    assert "Traceback" not in log and "out of system resource" not in log, log


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_listen_queue_stays_as_the_master_made_it(start_master, loop):
    """asyncio's loop is given a small accept batch as its backlog (see _StreamEndpoint.start):
    the listening socket's queue, shared by every worker, is still the backlog setting."""
    ss = require_tool("ss")
    master = start_master(app="workers.echo", mode="asyncio", loop=loop, workers=2, backlog=1000)
    master.wait_workers(2)
    assert master.request(b"hello") == b"hello"
    shown = subprocess.run([ss, "-Hltn", f"sport = :{master.address()[1]}"], capture_output=True, text=True,
                           timeout=SOCKET_TIMEOUT, check=True).stdout.split()
    assert shown[0] == "LISTEN" and shown[2] == "1000", shown  # Send-Q: the backlog of a listening socket
