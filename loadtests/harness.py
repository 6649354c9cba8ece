"""The one harness of every benchmark: start a server under test, stop it, measure, report. Runs in: bench.

("bench" is the benchmark's own process and the load it generates; the servers run in sessions
of their own, started from ``loadtests/servers.py``.)

Rules of the harness, which every suite inherits:

1. Loopback only; every server binds port 0 and the port is read back; every wait has a
   deadline (``time.monotonic()``).
2. Every server runs in a session of its own and is stopped by its process group (TERM, then
   KILL) when its ``with`` block ends, on error too; and it stops by itself after
   ``SERVER_LIFETIME`` (SIGALRM), so a benchmark killed with SIGKILL leaves nothing for long.
3. Figures are read from outside the servers (/proc through psutil, the kernel's CPU clocks).
4. One percentile: ``percentile`` (linear interpolation between the closest ranks, numpy's
   default). Only wrk's HTTP latencies are wrk's own (its histogram).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
COMMAND = ".venv/bin/python -m loadtests.bench"
# A server stops by itself after this long, whatever happens to the benchmark (rule 2).
SERVER_LIFETIME = 900
# Deadline for a server to serve (the no-preload memory case imports 100 MB in 4 workers on 2 CPUs).
START_TIMEOUT = 60.0
# Grace between TERM and KILL for a process group.
STOP_GRACE = 5.0
# How often a wait looks at its predicate: short beside any measured phase.
POLL = 0.02
# The 1-minute load average when the run started, for the report.
LOAD_BEFORE = [0.0]


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = POLL) -> Any:
    """Poll *predicate* until it returns a true value; RuntimeError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return value


def percentile(values: Sequence[float], fraction: float) -> float:
    """The *fraction* quantile of *values*, by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- stopping a process group ----------------------------------------------------------------------


def process_group_gone(pgid: int) -> bool:
    """True when no live (non-zombie) process is left in process group *pgid*."""
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return False
    return True


def stop_process_group(pgid: int, grace: float = STOP_GRACE) -> None:
    """TERM, then KILL after *grace* seconds, every process of group *pgid* (a session leader's pid)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: process_group_gone(pgid), grace, f"process group {pgid}")
            return


# -- a server under test ---------------------------------------------------------------------------

# granian logs each worker it starts; it has no when-ready hook (the others write the ready file).
_GRANIAN_WORKER = re.compile(r"Started worker-")


class Server:
    """One server of ``loadtests.servers`` in a session of its own: its ports, workers and CPU.

    *role* and *args* are ``loadtests.servers``' command line after the lifetime and the ready
    file; *cpu* pins the whole tree with taskset.
    """

    def __init__(self, role: str, args: Sequence[str], directory: Path, workers: int, cpu: int | None = None) -> None:
        self.role, self.workers, self.dir = role, workers, directory
        self.ready_file, self.log_path = directory / "ready.json", directory / "server.log"
        self.pidfile = directory / "master.pid"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop())
        argv = [sys.executable, "-m", "loadtests.servers", role, str(SERVER_LIFETIME), str(self.ready_file), *args]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFORK_", "GUNICORN_"))}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.tcp_port = self.udp_port = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return LOOPBACK, self.tcp_port

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> Server:
        wait_for(self._ready, START_TIMEOUT, f"{self.role} to serve")
        wait_for(lambda: len(self.worker_pids()) >= self.workers, START_TIMEOUT, f"{self.workers} workers")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        if self.role == "granian":
            return len(_GRANIAN_WORKER.findall(self.log())) >= self.workers and self._port_listened_on()
        if not self.ready_file.exists():
            return False
        ready = json.loads(self.ready_file.read_text())
        self.tcp_port = ready["port"]
        self.udp_port = ready.get("udp_port", self.tcp_port)  # servers of one port (stdlib, uvloop) say only "port"
        return True

    def _port_listened_on(self) -> bool:
        """The TCP port the server's process listens on (granian logs the port it was given: 0)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            for proc in (root, *root.children(recursive=True)):  # granian's workers hold the socket
                ports = [c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
                self.tcp_port = self.tcp_port or (ports[0] if ports else 0)
        return bool(self.tcp_port)

    def slots(self) -> list[Any]:
        """A prefork master's scoreboard slots in use (``prefork.scoreboard.SlotView``)."""
        from prefork.scoreboard import Scoreboard
        board = Scoreboard.open(f"{self.pidfile}.scoreboard")
        try:
            return [view for view in board.used() if view.pid]
        finally:
            board.close()

    def worker_pids(self) -> list[int]:
        """Workers ready to serve: idle or busy in the scoreboard, else the server's children."""
        if self.role == "prefork":
            return sorted(view.pid for view in self.slots() if view.state_name in ("idle", "busy"))
        with contextlib.suppress(psutil.NoSuchProcess):
            return sorted(child.pid for child in psutil.Process(self.pid).children())
        return []

    def cpu_seconds(self) -> float:
        """User + system time of the whole tree, reaped children included (rule 3)."""
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        """User and system time of the whole tree apart, reaped children included (rule 3)."""
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0, 0.0
        user = system = 0.0
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):  # a per-request child, counted once reaped
                t = proc.cpu_times()
                user += t.user + t.children_user
                system += t.system + t.children_system
        return user, system

    def stop(self) -> None:
        stop_process_group(self.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):  # KILL was sent; reaped with this process
            self.proc.wait(STOP_GRACE)
        self._log.close()


@contextlib.contextmanager
def serving(role: str, args: Sequence[str], directory: Path, workers: int = 0,
            cpu: int | None = None) -> Iterator[Server]:
    """A ready server for the block, stopped by its process group when the block ends (rule 2)."""
    directory.mkdir(parents=True, exist_ok=True)
    server = Server(role, args, directory, workers, cpu)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def prefork_master(directory: Path, workers: int, **options: Any) -> contextlib.AbstractContextManager[Server]:
    """A ``prefork.serve`` master (``loadtests.servers`` role ``prefork``) with *options*."""
    options = {"workers": workers, "pidfile": str(directory / "master.pid"), **options}
    return serving("prefork", [json.dumps(options)], directory, workers)


def process_cpu_seconds(pid: int) -> float:
    """User plus system time of process *pid* so far, from its kernel CPU clock (ns resolution).

    /proc/PID/stat counts in clock ticks (10 ms), a visible error over a run of a second or
    two; the process's CPU clock is exact. Linux names the clock of another process
    ``~pid << 3 | CPUCLOCK_SCHED`` (2).
    """
    return time.clock_gettime((~pid << 3) | 2)


# -- the report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def report_head(title: str, argv: Sequence[str], intro: str = "", cpu_note: str = "", tools: str = "") -> list[str]:
    """A report's title, intro and the table every report starts with: machine, versions, date, command, load."""
    generated = (f"Generated by `{' '.join([COMMAND, *argv[:1]])}` (the suite's docstring in "
                 f"`loadtests/suites/` explains the method); do not edit by hand, run it again.")
    return [
        f"# {title}", "", f"{intro} {generated}".strip(), "", "| | |", "|---|---|",
        f"| CPU | {cpu_model()} ({os.cpu_count()} logical CPUs{cpu_note}) |",
        f"| OS | {platform.system()} {platform.release()} |",
        f"| Python | {platform.python_implementation()} {platform.python_version()} |",
        f"| Tools | psutil {psutil.__version__}{tools} |",
        f"| Date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
        f"| Command | `{' '.join([COMMAND, *argv])}` |",
        (f"| Load average (1 min) | {LOAD_BEFORE[0]:.2f} before the run, {os.getloadavg()[0]:.2f} after "
         f"(other work on the machine moves every figure) |"),
        "",
    ]


def write_report(report: str, output: str) -> None:
    print(report)
    if output != "-":
        Path(output).write_text(report, encoding="utf-8")
        progress(f"wrote {output}")
