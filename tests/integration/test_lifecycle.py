"""Real masters: the Python API, listeners from outside, privileges, pidfile, hooks, sd_notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from prefork.errors import EXIT_BIND, EXIT_FAILURE, EXIT_OK
from prefork.scoreboard import Scoreboard
from tests.integration.conftest import ROOT, wait_pid_gone
from tests.support import SOCKET_TIMEOUT, require_tool, wait_until

pytestmark = pytest.mark.integration


def line_request(address, line: bytes, family=socket.AF_INET) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(address)
        sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
        return data[:-1]


@pytest.fixture
def program(tmp_path):
    """Run a python module in its own session; kill its process group on teardown."""
    procs: list[subprocess.Popen] = []

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(tmp_path / f"stderr{len(procs)}", "wb") as stderr:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                    stderr=stderr, start_new_session=True)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.stdout.close()


def ready_workers(pidfile: Path, count: int) -> set[int]:
    def ready():
        try:
            board = Scoreboard.open(f"{pidfile}.scoreboard")
        except FileNotFoundError:
            return set()
        try:
            pids = {v.pid for v in board.used() if v.state_name == "idle"}
        finally:
            board.close()
        return pids if len(pids) == count else set()
    return wait_until(ready, 30, message="workers not ready")


# -- the socketserver-style API ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "threaded"])
def test_prefork_tcp_server_in_a_with_block(program, tmp_path, kind):
    pidfile = tmp_path / "mixin.pid"
    proc = program("-m", "tests.integration.mixin_app", kind, str(pidfile))
    address = tuple(json.loads(proc.stdout.readline()))
    workers = ready_workers(pidfile, 2)
    pid, echoed = line_request(address, b"hi").split(b" ")
    assert int(pid) in workers and echoed == b"hi"
    titles = {" ".join(psutil.Process(p).cmdline()).strip() for p in workers}
    assert titles == {"prefork: worker 1 [mixin] gen 1", "prefork: worker 2 [mixin] gen 1"}
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == EXIT_OK
    for worker in workers:
        wait_pid_gone(worker)
    assert not pidfile.exists()


# -- listeners from outside -------------------------------------------------------------------


def test_busy_port_exits_4_naming_the_address(start_master):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        master = start_master(bind=[f"tcp://127.0.0.1:{port}"], ready=False)
        assert master.wait_exit() == EXIT_BIND
    assert f"127.0.0.1:{port}" in master.log() and "in use" in master.log()
    assert "Traceback" not in master.log()


def test_inherited_fd(start_master):
    with socket.create_server(("127.0.0.1", 0)) as sock:
        master = start_master(bind=[f"fd://{sock.fileno()}"], pass_fds=(sock.fileno(),), workers=1)
        address = sock.getsockname()
    assert line_request(address, b"pid") in {str(p).encode() for p in master.wait_workers(1)}


# /proc/net/unix's flag of a listening socket (__SO_ACCEPTCON in the kernel's net.h).
_UNIX_LISTENING = 0x10000


def unix_listening(path: Path) -> bool:
    """Whether a socket bound to *path* listens, seen in /proc/net/unix without connecting to it."""
    with open("/proc/net/unix") as table:
        next(table)  # Num RefCount Protocol Flags Type St Inode Path
        rows = [line.split() for line in table]
    return any(len(row) == 8 and row[7] == str(path) and int(row[3], 16) & _UNIX_LISTENING for row in rows)


def test_systemd_socket_activation(tmp_path):
    tool = require_tool("systemd-socket-activate")
    path = tmp_path / "act.sock"
    pidfile = tmp_path / "act.pid"
    ready = tmp_path / "ready.json"
    options = {"app": "tests.integration.apps", "bind": ["systemd"], "workers": 1,
               "pidfile": str(pidfile), "ready_file": str(ready)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([tool, "--listen", str(path), sys.executable, "-m", "tests.integration.runner",
                             json.dumps(options)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Not path.exists(): the tool binds, then listens; a connection in between is refused.
        wait_until(lambda: unix_listening(path), 10, message=f"nothing listens on {path}")
        # The tool starts the service on the first connection and hands it the socket.
        assert line_request(str(path), b"activated", socket.AF_UNIX) == b"activated"
        wait_until(ready.exists, 30)
        os.kill(json.loads(ready.read_text())["pid"], signal.SIGTERM)
        assert proc.wait(30) == EXIT_OK
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_reuse_port_gives_each_worker_its_own_socket(start_master):
    master = start_master(workers=2, reuse_port=True)
    workers = master.wait_workers(2)
    served = {int(master.request(b"pid")) for _ in range(60)}
    assert served <= workers and len(served) == 2, "the kernel balances across both sockets"


def test_ipv6_listener(start_master):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("::1 is not configured")
    master = start_master(bind=["tcp://[::1]:0"], workers=1)
    host, port = master.address()[:2]
    assert line_request((host, port), b"v6", socket.AF_INET6) == b"v6"


def test_unix_socket_mode(start_master, tmp_path):
    path = tmp_path / "mode.sock"
    start_master(bind=[f"unix:{path}"], workers=1, unix_mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- process --------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_workers_run_as_the_configured_user(start_master, readable_app):
    master = start_master(workers=2, user="nobody", group="nogroup", **readable_app)
    for pid in master.wait_workers(2):
        uids = psutil.Process(pid).uids()
        assert (uids.real, uids.effective) == (65534, 65534)
    assert psutil.Process(master.pid).uids().effective == 0, "the master keeps its privileges"
    assert master.request(b"still serving") == b"still serving"


def test_a_live_master_owns_its_pidfile(start_master, tmp_path):
    first = start_master(workers=1)
    second = start_master(workers=1, pidfile=str(first.pidfile), ready=False)
    assert second.wait_exit() == EXIT_FAILURE
    assert str(first.pidfile) in second.log() and str(first.pid) in second.log()
    assert int(first.pidfile.read_text()) == first.pid
    assert first.workers(), "the refused master left the first one's scoreboard alone"


def test_every_hook_runs_in_its_process(start_master, tmp_path):
    hook_log = tmp_path / "hooks.txt"
    names = ("on_starting", "pre_fork", "post_fork", "worker_exit", "on_exit")
    master = start_master(workers=2, env={"HOOK_LOG": str(hook_log)},
                          **{name: f"tests.integration.hooks_app:{name}" for name in names})
    workers = master.wait_workers(2)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == EXIT_OK
    calls = [line.split() for line in hook_log.read_text().splitlines()]
    in_master = [name for name, pid in calls if int(pid) == master.pid]
    in_workers = [name for name, pid in calls if int(pid) in workers]
    assert in_master == ["on_starting", "pre_fork", "pre_fork", "worker_exit", "worker_exit", "on_exit"]
    assert in_workers == ["post_fork", "post_fork"]


def test_sd_notify_messages_in_order(start_master, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(SOCKET_TIMEOUT)
        master = start_master(workers=1, env={"NOTIFY_SOCKET": str(path)})
        assert b"READY=1" in sock.recv(4096).split(b"\n")
        master.signal(signal.SIGHUP)
        assert b"RELOADING=1" in sock.recv(4096).split(b"\n")
        reloaded = sock.recv(4096).split(b"\n")
        assert b"READY=1" in reloaded and any(f.startswith(b"STATUS=") for f in reloaded)
        master.signal(signal.SIGTERM)
        assert b"STOPPING=1" in sock.recv(4096).split(b"\n")
        assert master.wait_exit() == EXIT_OK


def test_umask_applies_to_the_workers(start_master, tmp_path):
    master = start_master(workers=1, umask=0o027)
    assert master.request(b"touch %s" % str(tmp_path / "made-by-worker").encode()) == b"0o640"


def test_workers_dying_young_are_restarted_with_back_off(start_master):
    master = start_master(app="tests.integration.dies_young", workers=1, ready=False)
    started = time.monotonic()
    deaths = lambda: master.log().count("died unexpectedly")  # noqa: E731
    wait_until(lambda: deaths() >= 5, timeout=30, message=master.log())
    # Without back-off five deaths take a few milliseconds; with it at least 0.1+0.2+0.4+0.8 s.
    assert time.monotonic() - started >= 1.5
    assert master.proc.poll() is None, "a worker dying at import is not a boot failure to halt on"
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == EXIT_OK


def test_sd_notify_mainpid_follows_an_upgrade(start_master, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(SOCKET_TIMEOUT)
        master = start_master(workers=1, env={"NOTIFY_SOCKET": str(path)})
        old = master.pid
        assert b"READY=1" in sock.recv(4096).split(b"\n")
        master.ready_file.unlink()
        master.signal(signal.SIGUSR2)
        new = json.loads(wait_until(lambda: master.ready_file.exists() and master.ready_file.read_text(),
                                    timeout=30, message=master.log()))["pid"]
        assert new != old
        messages = []
        wait_until(lambda: messages.extend(sock.recv(4096).split(b"\n")) or f"MAINPID={new}".encode() in messages,
                   timeout=30, message=f"no MAINPID={new} in {messages}")
        wait_pid_gone(old, timeout=30)
        os.kill(new, signal.SIGTERM)
        wait_pid_gone(new, timeout=30)
