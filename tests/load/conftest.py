"""Smoke load tests: headless locust (a subprocess) against a real master started by the CLI.

Both run in sessions of their own and are stopped by process group (TERM, then KILL) in
teardown, on failure too. Locust runs as a subprocess so that its gevent monkey-patching never
touches pytest's process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from prefork.scoreboard import Scoreboard
from tests.support import kill_process_group, wait_until

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
LOCUST_CONF = ROOT / "loadtests" / "locust.conf"
# How long a master gets to have every worker accepting; how long a stop may take.
START_TIMEOUT = 10.0
STOP_GRACE = 5.0
# Locust runs for RUN_TIME, then gets STOP_TIMEOUT (its --stop-timeout) to stop its users;
# past LOCUST_DEADLINE the run is killed and the test fails.
RUN_TIME = "5s"
STOP_TIMEOUT = "2"
LOCUST_DEADLINE = 20.0
# "master 123 serving tcp://127.0.0.1:40123, udp://127.0.0.1:51234 with 2 workers"
_SERVING = re.compile(r"master \d+ serving (.+) with \d+ workers")


def require_locust() -> None:
    """Skip without locust (the `load` extra); in CI (CI_REQUIRE_TOOLS=1) fail instead."""
    if importlib.util.find_spec("locust") is not None:
        return
    if os.environ.get("CI_REQUIRE_TOOLS") == "1":
        pytest.fail("locust is required in CI (CI_REQUIRE_TOOLS=1): install the 'load' extra")
    pytest.skip("needs locust: pip install -e '.[load]'")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFORK_", "LOCUST_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


class Group:
    """A subprocess in a session of its own, stopped by its process group."""

    def __init__(self, argv: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env={**_env(), **(env or {})}, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        kill_process_group(self.proc.pid, STOP_GRACE, STOP_GRACE)
        if self.proc.poll() is None:
            self.proc.wait(STOP_GRACE)
        self._log.close()


class LoadMaster(Group):
    """`python -m prefork run ARGS --pidfile DIR/master.pid`, with its bound addresses read back."""

    def __init__(self, directory: Path, args: list[str]) -> None:
        self.dir = directory
        self.pidfile = directory / "master.pid"
        super().__init__([sys.executable, "-m", "prefork", "run", *args, "--pidfile", str(self.pidfile)],
                         directory, directory / "master.log")
        self.listeners: list[str] = []

    def wait_ready(self, workers: int) -> LoadMaster:
        """Wait for the "serving ..." line (the addresses, ports resolved) and every worker idle."""
        wait_until(lambda: self._serving(), START_TIMEOUT, message=f"master not serving:\n{self.log()}")
        wait_until(lambda: self._ready(workers), START_TIMEOUT, message=f"{workers} workers not ready:\n{self.log()}")
        return self

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log()}")
        found = _SERVING.search(self.log())
        if found:
            self.listeners = found.group(1).split(", ")
        return bool(found)

    def _ready(self, count: int) -> bool:
        try:
            board = Scoreboard.open(f"{self.pidfile}.scoreboard")
        except (FileNotFoundError, ValueError):
            return False
        try:
            slots = board.used()
        finally:
            board.close()
        return len(slots) == count and all(s.pid and s.state_name == "idle" for s in slots)

    def listener(self, scheme: str) -> str:
        return next(spec for spec in self.listeners if spec.startswith(scheme))

    def status(self) -> dict[str, Any]:
        """`prefork status --json`, as an operator runs it."""
        done = subprocess.run([sys.executable, "-m", "prefork", "status", "--json", "-p", str(self.pidfile)],
                              cwd=self.dir, env=_env(), capture_output=True, timeout=START_TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return dict(json.loads(done.stdout))

    def requests_by_worker(self) -> dict[int, int]:
        return {row["pid"]: row["requests"] for row in self.status()["workers"]}


@pytest.fixture
def load_master(tmp_path: Path) -> Iterator[Any]:
    """load_master(*run_args, workers=2) -> a ready LoadMaster; every one is killed on teardown."""
    started: list[LoadMaster] = []

    def start(*args: str, workers: int = 2) -> LoadMaster:
        directory = tmp_path / f"m{len(started)}"
        directory.mkdir()
        master = LoadMaster(directory, [*args, "--workers", str(workers)])
        started.append(master)
        return master.wait_ready(workers)

    yield start
    for master in started:
        master.kill_group()


class LocustRun:
    """The outcome of one headless locust run: exit code, aggregated CSV row, log."""

    def __init__(self, returncode: int, stats: list[dict[str, str]], log: str) -> None:
        self.returncode = returncode
        self.stats = stats
        self.log = log

    @property
    def total(self) -> dict[str, str]:
        return next(row for row in self.stats if row["Name"] == "Aggregated")

    @property
    def requests(self) -> int:
        return int(self.total["Request Count"])

    @property
    def failures(self) -> int:
        return int(self.total["Failure Count"])


@pytest.fixture
def locust(tmp_path: Path) -> Iterator[Any]:
    """locust(host, *user_classes, users=8) -> LocustRun: headless, RUN_TIME, CSV into tmp_path."""
    require_locust()
    runs: list[Group] = []

    def run(host: str, *user_classes: str, users: int = 8) -> LocustRun:
        prefix = tmp_path / f"locust{len(runs)}"
        argv = [sys.executable, "-m", "locust", "--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE),
                "--headless", "-u", str(users), "-r", str(users), "-t", RUN_TIME, "--stop-timeout", STOP_TIMEOUT,
                "--host", host, "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
                "--loglevel", "WARNING", *user_classes]
        group = Group(argv, tmp_path, tmp_path / f"locust{len(runs)}.log")
        runs.append(group)
        try:
            returncode = group.proc.wait(LOCUST_DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"locust still running after {LOCUST_DEADLINE} s:\n{group.log()}") from None
        with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as file:
            stats = list(csv.DictReader(file))
        return LocustRun(returncode, stats, group.log())

    yield run
    for group in runs:
        group.kill_group()
