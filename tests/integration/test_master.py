"""A real master in a subprocess: listeners, signals and supervision rules, with client load."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import textwrap
import time

import psutil
import pytest

from prefork.errors import EXIT_APP_LOAD, EXIT_OK
from tests.integration.conftest import wait_pid_gone
from tests.support import SOCKET_TIMEOUT, datagram_request, wait_until

pytestmark = pytest.mark.integration


def concurrently(master, lines, index=0):
    with concurrent.futures.ThreadPoolExecutor(len(lines)) as pool:
        return list(pool.map(lambda line: master.request(line, index), lines))


def free_port_for_tcp_and_udp() -> int:
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both TCP and UDP")


# -- serving ------------------------------------------------------------------------------------


def test_tcp_and_udp_on_one_port_served_by_every_worker(start_master):
    port = free_port_for_tcp_and_udp()
    master = start_master(bind=[f"tcp://127.0.0.1:{port}", f"udp://127.0.0.1:{port}"], workers=2)
    assert master.request(b"hello") == b"hello"
    assert datagram_request(("127.0.0.1", port), b"ping") == b"ping"
    workers = master.wait_workers(2)
    # Two slow requests at once: a sync worker serves one at a time, so both workers serve.
    pids = concurrently(master, [b"sleep 0.5", b"pid", b"pid"])
    served = {int(p) for p in pids[1:]}
    assert pids[0] == b"slept" and served <= workers


def test_unix_stream_and_datagram_listeners_removed_on_stop(start_master, tmp_path):
    path = tmp_path / "s.sock"
    master = start_master(bind=[f"unix:{path}"], workers=1)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(str(path))
        sock.sendall(b"unix\n")
        assert sock.recv(100) == b"unix\n"
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == EXIT_OK
    assert not path.exists()
    assert not master.pidfile.exists()
    assert not os.path.exists(f"{master.pidfile}.scoreboard")


def test_a_crashing_handler_is_logged_and_the_worker_goes_on(start_master):
    master = start_master(workers=1)
    pid = master.request(b"pid")
    with pytest.raises(ConnectionError):
        master.request(b"raise")
    assert master.request(b"pid") == pid
    assert "the handler failed on purpose" in master.log()
    assert "Traceback" in master.log()


@pytest.mark.parametrize("command", [b"exit", b"_exit"])
def test_a_worker_that_exits_is_replaced(start_master, command):
    master = start_master(workers=1)
    pid = int(master.request(b"pid"))
    with pytest.raises(ConnectionError):
        master.request(command)
    wait_pid_gone(pid)
    # Until the master reaps the old worker, its slot may still show it: wait for another pid.
    (new,) = wait_until(lambda: master.ready_pids() - {pid}, message=str(master.workers()))
    assert master.request(b"ok") == b"ok"
    assert int(master.request(b"pid")) == new


# -- stopping -----------------------------------------------------------------------------------


def test_term_finishes_in_flight_requests_and_exits_0(start_master):
    master = start_master(workers=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(master.request, b"sleep 1")
        wait_until(lambda: any(v.state_name == "busy" for v in master.workers()))
        master.signal(signal.SIGTERM)
        assert slow.result() == b"slept"
    assert master.wait_exit() == EXIT_OK


def test_term_serves_connections_waiting_in_the_backlog(start_master):
    master = start_master(workers=1)
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        busy = pool.submit(master.request, b"sleep 1")
        wait_until(lambda: any(v.state_name == "busy" for v in master.workers()))
        queued = [pool.submit(master.request, b"queued %d" % i) for i in range(8)]
        time.sleep(0.2)  # not synchronisation: lets the 8 connections reach the kernel's queue
        master.signal(signal.SIGTERM)
        assert busy.result() == b"slept"
        assert sorted(f.result() for f in queued) == sorted(b"queued %d" % i for i in range(8))
    assert master.wait_exit() == EXIT_OK


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_fast(start_master, signum):
    master = start_master(workers=2)
    pids = master.wait_workers(2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(master.request, b"sleep 30")
        wait_until(lambda: any(v.state_name == "busy" for v in master.workers()))
        started = time.monotonic()
        master.signal(signum)
        assert master.wait_exit(timeout=10) == EXIT_OK
        assert time.monotonic() - started < 10
        with pytest.raises(ConnectionError):
            slow.result()
    for pid in pids:
        wait_pid_gone(pid)


def test_graceful_timeout_kills_what_is_left(start_master):
    master = start_master(workers=1, graceful_timeout=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(master.request, b"sleep 30")
        wait_until(lambda: any(v.state_name == "busy" for v in master.workers()))
        master.signal(signal.SIGTERM)
        assert master.wait_exit(timeout=15) == EXIT_OK
        with pytest.raises(ConnectionError):
            slow.result()
    assert "SIGKILL" in master.log()


def test_workers_die_with_the_master_and_the_port_is_free(start_master):
    master = start_master(workers=3)
    pids = master.wait_workers(3)
    address = master.address()
    master.proc.send_signal(signal.SIGKILL)
    master.proc.wait(10)
    for pid in pids:
        wait_pid_gone(pid, timeout=1.0)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)


# -- supervision --------------------------------------------------------------------------------


def test_sigkill_of_a_worker_loses_only_its_requests(start_master, load):
    master = start_master(workers=2)
    running = load(master, clients=4)
    running.wait_requests(50)
    victim = next(iter(master.wait_workers(2)))
    os.kill(victim, signal.SIGKILL)
    wait_pid_gone(victim)
    master.wait_workers(2)
    running.wait_requests(200)
    running.stop()
    # Only requests the victim had accepted can fail: at most one per client.
    assert len(running.failures) <= 4, running.failures


def test_a_stopped_worker_is_killed_after_timeout_with_its_traceback(start_master):
    master = start_master(workers=1, timeout=1)
    (pid,) = master.wait_workers(1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hung = pool.submit(master.request, b"sleep 5")
        wait_until(lambda: any(v.state_name == "busy" for v in master.workers()))
        os.kill(pid, signal.SIGSTOP)
        wait_pid_gone(pid, timeout=15)
        with pytest.raises(ConnectionError):
            hung.result()
    wait_until(lambda: master.ready_pids() - {pid}, message=str(master.workers()))
    log = master.log()
    assert "SIGABRT" in log and "(timeout)" in log and "request from 127.0.0.1:" in log
    assert 'File "' in log and "answer" in log, "the worker's traceback was not dumped"
    assert master.request(b"ok") == b"ok"


def test_boot_failure_exits_3_and_shows_the_error_once(start_master):
    master = start_master(app="tests.integration.no_such_module", workers=3, ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    log = master.log()
    assert log.count("no module named 'tests.integration.no_such_module'") == 1, log
    assert log.count("worker") < 20, "the master kept forking"


def test_missing_attribute_exits_3(start_master):
    master = start_master(app="tests.integration.apps:Missing", workers=2, ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "has no attribute 'Missing'" in master.log()


@pytest.mark.parametrize("settings,command", [
    ({"max_requests": 20, "max_requests_jitter": 5}, b"hello"),
    ({"max_worker_lifetime": 1.0}, b"hello"),
    ({"max_worker_memory": 100_000_000}, b"grow 30000000"),
])
def test_recycling_under_load_fails_no_request(start_master, load, settings, command):
    master = start_master(workers=2, **settings)
    first = master.wait_workers(2)
    running = load(master, clients=3, line=command if command == b"hello" else b"hello")
    if command != b"hello":
        for _ in range(12):
            master.request(command)
    wait_until(lambda: first - master.worker_pids(), timeout=30,
               message=f"workers not recycled: {master.workers()}")
    running.wait_requests(50)
    running.stop()
    assert running.failures == []
    assert "recycl" in master.log() or "max_" in master.log()


# -- signals ------------------------------------------------------------------------------------


def test_hup_replaces_every_worker_under_load_without_a_failure(start_master, load):
    master = start_master(workers=2)
    old = master.wait_workers(2, generation=1)
    running = load(master, clients=4)
    running.wait_requests(50)
    master.signal(signal.SIGHUP)
    new = master.wait_workers(2, generation=2)
    running.wait_requests(50)
    running.stop()
    assert not (old & new)
    assert running.failures == []


def test_hup_loads_new_code_without_preload(start_master, tmp_path):
    module = tmp_path / "hotapp.py"
    source = textwrap.dedent("""
        from prefork.handlers import StreamRequestHandler
        class StreamHandler(StreamRequestHandler):
            def handle(self):
                self.rfile.readline()
                self.wfile.write(b"VERSION\\n")
    """)
    module.write_text(source.replace("VERSION", "one"))
    master = start_master(app="hotapp", workers=1, pythonpath=tmp_path)
    assert master.request(b"x") == b"one"
    module.write_text(source.replace("VERSION", "two"))
    master.signal(signal.SIGHUP)
    master.wait_workers(1, generation=2)
    assert master.request(b"x") == b"two"


def test_ttin_ttou_under_load_fail_no_request(start_master, load):
    master = start_master(workers=2)
    master.wait_workers(2)
    running = load(master, clients=3)
    running.wait_requests(30)
    master.signal(signal.SIGTTIN)
    master.wait_workers(3)
    # One at a time: two signals of one kind sent before the first is handled merge into one.
    master.signal(signal.SIGTTOU)
    master.wait_workers(2)
    master.signal(signal.SIGTTOU)
    master.wait_workers(1)
    master.signal(signal.SIGTTOU)  # never below one worker
    master.wait_workers(1)
    running.wait_requests(30)
    running.stop()
    assert running.failures == []


def test_winch_stops_the_workers_and_keeps_the_master(start_master):
    master = start_master(workers=2)
    pids = master.wait_workers(2)
    master.signal(signal.SIGWINCH)
    for pid in pids:
        wait_pid_gone(pid)
    assert master.proc.poll() is None
    master.signal(signal.SIGHUP)
    master.wait_workers(2)
    assert master.request(b"back") == b"back"


@pytest.mark.parametrize("app", [{}, {"app": "tests.integration.aio_apps", "mode": "asyncio"}], ids=["sync", "asyncio"])
def test_usr2_upgrades_in_place_under_load(start_master, load, app):
    master = start_master(workers=2, **app)
    old_pid, old_workers = master.pid, master.wait_workers(2)
    running = load(master, clients=3)
    running.wait_requests(30)
    master.ready_file.unlink()
    master.signal(signal.SIGUSR2)
    wait_until(master.ready_file.exists, 30, message=master.log())
    new_pid = master.read_ready().pid  # the old master, this object's process, may be gone already
    assert new_pid != old_pid
    wait_pid_gone(old_pid, timeout=30)
    wait_until(lambda: master.pidfile.exists() and int(master.pidfile.read_text()) == new_pid, 10)
    new_workers = master.wait_workers(2)
    running.wait_requests(30)
    running.stop()
    assert not (old_workers & new_workers)
    assert running.failures == []
    os.kill(new_pid, signal.SIGTERM)
    wait_pid_gone(new_pid, timeout=30)


# -- modes, titles, hooks -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_thread_and_fork_modes_serve_concurrently_in_one_worker(start_master, mode):
    master = start_master(workers=1, mode=mode, threads=4)
    started = time.monotonic()
    assert concurrently(master, [b"sleep 1"] * 3) == [b"slept"] * 3
    assert time.monotonic() - started < 2.5, "requests were served one after another"


def test_process_titles(start_master):
    master = start_master(workers=2, name="titled")
    pids = master.wait_workers(2)
    titles = sorted(" ".join(psutil.Process(pid).cmdline()).strip() for pid in pids)
    assert titles == ["prefork: worker 1 [titled] gen 1", "prefork: worker 2 [titled] gen 1"]
    assert " ".join(psutil.Process(master.pid).cmdline()).strip() == "prefork: master [titled]"


def test_preload_imports_the_app_once_in_the_master(start_master):
    preloaded = start_master(app="tests.integration.apps", workers=2, preload=True)
    assert int(preloaded.request(b"imported-in")) == preloaded.pid
    plain = start_master(app="tests.integration.apps", workers=1)
    assert int(plain.request(b"imported-in")) in plain.wait_workers(1)


def test_adaptive_pool_grows_with_busy_workers(start_master):
    master = start_master(workers=1, min_workers=1, max_workers=4, min_spare=1, max_spare=2)
    master.wait_workers(1)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(master.request, b"sleep 3") for _ in range(3)]
        wait_until(lambda: len(master.ready_pids()) >= 3, timeout=10, message=str(master.workers()))
        assert [f.result() for f in slow] == [b"slept"] * 3
