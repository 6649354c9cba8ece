"""Real masters in subprocesses, each in its own session; teardown kills the process group."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import psutil
import pytest

from prefork.listeners import parse_bind
from prefork.scoreboard import Scoreboard, SlotView
from tests.support import SOCKET_TIMEOUT, kill_process_group, skip_or_fail, wait_until

ROOT = Path(__file__).resolve().parents[2]
# How long a master gets to start every worker, or to stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

T = TypeVar("T")


class Master:
    """One prefork master started by a test."""

    def __init__(self, directory: Path, app: str, bind: list[str], pythonpath: Path | None = None,
                 env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (), cwd: Path = ROOT,
                 preexec_fn: Callable[[], None] | None = None, **settings: Any) -> None:
        self.dir = directory
        self.ready_file = directory / "ready.json"
        self.pidfile = directory / "master.pid"
        self.log_path = directory / "master.log"
        options = {"app": app, "bind": bind, "ready_file": str(self.ready_file),
                   "pidfile": str(self.pidfile), **settings}
        self._log = open(self.log_path, "wb")
        path = os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p)
        full_env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.runner", json.dumps(options)],
            cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=pass_fds, preexec_fn=preexec_fn)  # preexec_fn: e.g. a resource limit the master starts with
        self.pgid = self.proc.pid
        self.info: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Master:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log()}")
            return self.ready_file.exists()
        wait_until(ready, timeout, message=f"master not ready:\n{self.log()}")
        return self.read_ready()

    def read_ready(self) -> Master:
        """What the ready file says now: after an upgrade (USR2), the new master's pid and
        listeners, while the process this object started may have exited already."""
        self.info = json.loads(self.ready_file.read_text())
        return self

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    @property
    def pid(self) -> int:
        return int(self.info.get("pid") or self.proc.pid)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"master did not exit within {timeout}s:\n{self.log()}") from None

    def kill_group(self) -> None:
        """Teardown: TERM then KILL everything in the master's process group."""
        kill_process_group(self.pgid)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    # -- what it serves --------------------------------------------------------------------------

    def address(self, index: int = 0) -> Any:
        return parse_bind(self.info["listeners"][index]).address

    def workers(self) -> list[SlotView]:
        return self.from_scoreboard(lambda board: [view for view in board.used() if view.pid])

    def from_scoreboard(self, read: Callable[[Scoreboard], T]) -> T:
        """What *read* finds in the master's scoreboard, opened for it and closed after."""
        board = Scoreboard.open(f"{self.pidfile}.scoreboard")
        try:
            return read(board)
        finally:
            board.close()

    def worker_pids(self) -> set[int]:
        return {view.pid for view in self.workers()}

    def ready_pids(self, generation: int | None = None) -> set[int]:
        return self.pids_now(generation)[0]

    def pids_now(self, generation: int | None = None) -> tuple[set[int], set[int]]:
        """(the ready workers' pids, of *generation* if given; every worker's pid), from one
        reading of the scoreboard. Two readings disagree while the master replaces a worker: a
        killed worker's slot still says idle until it is reaped, then names its successor."""
        views = self.workers()
        ready = {v.pid for v in views
                 if v.state_name in ("idle", "busy") and (generation is None or v.generation == generation)}
        return ready, {v.pid for v in views}

    def wait_workers(self, count: int, generation: int | None = None, timeout: float = START_TIMEOUT) -> set[int]:
        """The pids of *count* ready workers, once they are all the workers there are."""
        def settled() -> set[int] | None:
            ready, every = self.pids_now(generation)
            return ready if len(ready) == len(every) == count else None
        return wait_until(settled, timeout,
                          message=f"expected {count} ready workers (generation {generation}): {self.workers()}")

    def request(self, line: bytes, index: int = 0, timeout: float = SOCKET_TIMEOUT) -> bytes:
        with socket.create_connection(self.address(index), timeout=timeout) as sock:
            sock.sendall(line + b"\n")
            return _read_line(sock)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data[:-1]


@pytest.fixture
def start_master(tmp_path):
    """start_master(app=..., bind=[...], **settings) -> a ready Master; all are killed on teardown."""
    masters: list[Master] = []

    def start(app: str = "tests.integration.apps", bind: list[str] | None = None, ready: bool = True,
              **settings: Any) -> Master:
        directory = tmp_path / f"m{len(masters)}"
        directory.mkdir()
        settings.setdefault("workers", 2)
        master = Master(directory, app, bind or ["tcp://127.0.0.1:0"], **settings)
        masters.append(master)
        return master.wait_ready() if ready else master

    yield start
    for master in masters:
        master.kill_group()


@pytest.fixture(scope="session")
def open_dirs() -> Iterator[list[Path]]:
    """The open directories of the session, removed when it ends (see open_dir)."""
    made: list[Path] = []
    yield made
    for directory in made:
        shutil.rmtree(directory)


@pytest.fixture
def open_dir(open_dirs: list[Path]) -> Path:
    """A fresh directory under the temporary directory that every user may enter and read.

    Workers that switch to another user (nobody) import the app as that user, and the checkout
    may sit under a directory that user cannot enter (any home directory, mode 0700).
    Removed at the end of the session, not of the test: a test's masters are stopped after its
    own fixtures are torn down, and one of them (running as root) may still be writing the
    app's bytecode into the directory while it is removed ("Directory not empty").
    """
    directory = Path(tempfile.mkdtemp(prefix="prefork-open-"))
    open_dirs.append(directory)
    directory.chmod(0o755)
    _require_reachable(directory)
    return directory


@pytest.fixture
def readable_app(open_dir: Path) -> dict[str, Any]:
    """``start_master(**readable_app, user=...)``: the test app copied where any user can read it."""
    copy = open_dir / "readable_apps.py"
    shutil.copyfile(Path(__file__).with_name("apps.py"), copy)
    copy.chmod(0o644)
    return {"app": "readable_apps", "pythonpath": open_dir}


def _require_reachable(directory: Path) -> None:
    """Skip (fail under CI_REQUIRE_TOOLS=1) if other users cannot enter *directory*."""
    closed = [p for p in (directory, *directory.parents) if not os.stat(p).st_mode & stat.S_IXOTH]
    if closed:
        skip_or_fail(f"other users cannot enter {closed[0]}, which holds the temporary directory "
                     f"{directory}: set TMPDIR to a directory everyone may enter")


class Load:
    """A client load in threads: each request opens a connection, sends a line, checks the echo."""

    def __init__(self, master: Master, clients: int = 4, line: bytes = b"hello") -> None:
        self.master = master
        self.line = line
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"load-{i}") for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(SOCKET_TIMEOUT * 2)

    def _run(self) -> None:
        # Bounded: each client makes at most this many requests, whatever happens.
        for _ in range(100_000):
            if self._stop.is_set():
                return
            try:
                reply = self.master.request(self.line)
                outcome = None if reply == self.line else f"wrong reply {reply!r}"
            except OSError as exc:
                outcome = repr(exc)
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        start = self.ok
        wait_until(lambda: self.ok - start >= count, timeout, message=f"load stalled at {self.ok}: {self.failures[:5]}")


@pytest.fixture
def load():
    loads: list[Load] = []

    def make(master: Master, clients: int = 4, line: bytes = b"hello") -> Load:
        running = Load(master, clients, line).__enter__()
        loads.append(running)
        return running

    yield make
    for running in loads:
        running.stop()


def wait_pid_gone(pid: int, timeout: float = 10.0) -> None:
    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_until(gone, timeout, message=f"process {pid} still alive")


def monotonic_ms() -> float:
    return time.monotonic() * 1000
