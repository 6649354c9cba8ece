"""Benchmarks of the core: prefork.socketserver against the stdlib's socketserver. Runs in: bench.

Run from the repository root, on a Linux machine with at least two CPUs:

    .venv/bin/python -m loadtests.bench core

About a minute; it prints the report and writes ``docs/benchmarks-core.md`` (``--help``: the options).

Rules of this suite (beside the harness's, ``loadtests/harness.py``):

1. Both implementations get the same work in the same run: the same handler code, the same
   random shutdown points, the same client. Their turns alternate (stdlib, prefork, prefork,
   stdlib, ...) so that a drift of the machine does not favour one side: for the CPU
   benchmark both servers run side by side and take turns every batch (tens of milliseconds),
   because runs of a few seconds one after the other differed by up to 20% on a shared
   virtual machine, whatever the implementation.
2. Server CPU is the kernel's per-process CPU clock, so no instrumentation runs on the measured path.

The two benchmarks:

- **shutdown latency**: ``serve_forever()`` with the default poll interval (0.5 s) in a thread,
  ``shutdown()`` from the main thread at a random point; the time until ``shutdown()`` returns.
- **CPU per request**: a plain synchronous ``TCPServer`` with a one-line echo handler in its
  own process pinned to CPU 1; the load generator, one non-blocking loop of short connections
  (connect, one line, read the echo until EOF, close), pinned to CPU 0.

Why the load is gated by default. On loopback the TCP handshake and teardown are processed in
the context of the process that connects and closes, so a client pays about as much CPU per
connection as the server does (measured: ~50 µs, nearly three quarters of it in the kernel).
A client running freely beside the server therefore cannot keep the server's queue full: the
server waits in epoll between requests, and each sleep and wake-up adds CPU to the server's
bill, more for the faster server (measured: ~58 µs per request free, ~40 µs gated). In gated
mode the client opens a *gate* connection without sending, queues a batch of connections behind
it (their lines already sent; the synchronous server is blocked on the gate meanwhile), then
sends the gate's line: the server drains the whole batch back to back, never waiting for the
client. ``--load free`` runs the free-running loop instead.

Linux only: it pins, reads CPU clocks of other processes and waits with epoll.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from loadtests.harness import ROOT, positive, percentile, process_cpu_seconds, progress, report_head, serving, write_report
from loadtests.load import FreeLoad, GatedBatches, Served
from loadtests.servers import make_stdlib

# The comparison: the stdlib's module is imported only by name, in this suite.
STDLIB = "socketserver"
PREFORK = "prefork.socketserver"
IMPLEMENTATIONS = (STDLIB, PREFORK)
OUTPUT = ROOT / "docs" / "benchmarks-core.md"

# The load generator and the server each get a CPU of their own, so neither steals the
# other's time and the server's CPU clock counts only the server.
CLIENT_CPU = 0
SERVER_CPU = 1

# Let serve_forever() enter its loop before the random shutdown point starts counting, so
# every trial measures a running loop, not a thread that has not started yet.
SETTLE_DELAY = 0.02
# The stdlib's default poll interval: shutdown points are spread uniformly over one period.
DEFAULT_POLL_INTERVAL = 0.5
# The goal for prefork's median shutdown latency (the stdlib's is half a poll interval).
SHUTDOWN_GOAL = 0.005
# A shutdown() that has not returned by then is a hang: dump the stacks and exit.
SHUTDOWN_HANG_TIMEOUT = 30.0
# How long serve_forever() may take to return after shutdown() (one poll interval) plus slack.
SERVER_STOP_TIMEOUT = 5.0

# Gated mode: connections queued behind each gate. Large enough that the gate's own cost and
# the drain's first wake-up are lost in the batch, small enough for the default somaxconn.
DEFAULT_BATCH = 500
# Free mode: requests given to one server before the other one's turn.
FREE_CHUNK = 1_000
# Free mode: connections in flight. The server keeps the default backlog (request_queue_size
# = 5) there; staying under it means no SYN is ever dropped, which would add a one-second
# retransmission and measure the kernel's timer instead of the server.
DEFAULT_CONCURRENCY = 4


def make_echo_server(implementation: str, backlog: int | None = None) -> Any:
    """A plain synchronous TCPServer of *implementation* with the one-line echo, on port 0."""
    return make_stdlib({"server": "TCPServer", "handler": "one-line", "module": implementation, "backlog": backlog})


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def _alternating(items: Sequence[Any], turn: int) -> list[Any]:
    """*items* in order on even turns, reversed on odd ones (A B, B A, A B, ...)."""
    return list(items) if turn % 2 == 0 else list(reversed(items))


# -- benchmark 1: shutdown latency -----------------------------------------------------------------


def measure_shutdown(implementation: str, delay: float) -> float:
    """Seconds from calling shutdown() until it returns, *delay* seconds into serve_forever()."""
    server = make_echo_server(implementation)
    thread = threading.Thread(target=server.serve_forever, name="serve_forever", daemon=True)
    thread.start()
    try:
        time.sleep(SETTLE_DELAY + delay)
        # shutdown() has no timeout of its own: a hang must end the run, not stall it.
        faulthandler.dump_traceback_later(SHUTDOWN_HANG_TIMEOUT, exit=True)
        try:
            start = time.perf_counter()
            server.shutdown()
            return time.perf_counter() - start
        finally:
            faulthandler.cancel_dump_traceback_later()
    finally:
        thread.join(SERVER_STOP_TIMEOUT)
        server.server_close()
        if thread.is_alive():
            raise RuntimeError(f"{implementation}: serve_forever() still running after shutdown()")


def bench_shutdown(trials: int, rng: random.Random) -> dict[str, list[float]]:
    """Alternate the two implementations, each pair sharing one random shutdown point."""
    samples: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for trial in range(trials):
        delay = rng.uniform(0.0, DEFAULT_POLL_INTERVAL)
        for name in _alternating(IMPLEMENTATIONS, trial):
            samples[name].append(measure_shutdown(name, delay))
    return samples


# -- benchmark 2: measuring one round --------------------------------------------------------------


def backlog(settings: argparse.Namespace) -> int | None:
    """The servers' listen backlog: the default, except where a whole batch must queue."""
    return settings.batch + 1 if settings.load == "gated" else None


def chunk(settings: argparse.Namespace) -> int:
    """Requests given to one server before the other one's turn."""
    return settings.batch if settings.load == "gated" else FREE_CHUNK


def make_load(settings: argparse.Namespace, port: int) -> GatedBatches | FreeLoad:
    if settings.load == "gated":
        return GatedBatches(("127.0.0.1", port), settings.batch)
    return FreeLoad(("127.0.0.1", port), settings.concurrency)


@dataclasses.dataclass
class CpuRun:
    """One implementation's share of one round."""

    implementation: str
    turn: int
    served: Served = dataclasses.field(default_factory=Served)
    server_cpu: float = 0.0  # over the measured phase: exactly the served requests' work
    server_user: float = 0.0
    server_system: float = 0.0
    client_cpu: float = 0.0

    def us(self, seconds: float) -> float:
        """*seconds* of CPU per request, in µs."""
        return seconds / self.served.requests * 1e6

    @property
    def requests_per_second(self) -> float:
        return self.served.requests / self.served.wall

    @property
    def cpu_us_per_request(self) -> float:
        return self.us(self.server_cpu)

    @property
    def server_busy(self) -> float:
        """Share of its CPU the server used while working: near 1.0 means it set the pace."""
        return self.served.server_cpu / self.served.wall

    def record_server(self, pid: int, sign: float) -> None:
        """Add (sign 1) or subtract (sign -1) the server's CPU times so far."""
        times = psutil.Process(pid).cpu_times()
        self.server_cpu += sign * process_cpu_seconds(pid)
        self.server_user += sign * times.user
        self.server_system += sign * times.system


def measure_round(turn: int, settings: argparse.Namespace, server_cpu: int | None, directory: Path) -> list[CpuRun]:
    """Both implementations in fresh processes side by side, served in alternating chunks.

    Alternating every chunk (a batch, tens of milliseconds) puts both through the same
    machine weather (see rule 1). While one server works the other waits in its loop,
    which costs it nothing measurable.
    """
    runs = [CpuRun(name, turn) for name in IMPLEMENTATIONS]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(serving("stdlib", [json.dumps(
            {"server": "TCPServer", "handler": "one-line", "module": name, "backlog": backlog(settings)})],
            directory / f"{turn}-{name}", cpu=server_cpu)) for name in IMPLEMENTATIONS]
        loads = [make_load(settings, server.tcp_port) for server in servers]
        for load, server in zip(loads, servers):
            load.run(settings.warmup, server.pid)
        for run, server in zip(runs, servers):
            run.record_server(server.pid, -1)
        for turn_of_chunk in range(-(-settings.requests // chunk(settings))):
            for index in _alternating(range(len(runs)), turn_of_chunk):
                _serve_chunk(runs[index], loads[index], servers[index].pid, chunk(settings))
        for run, server in zip(runs, servers):
            run.record_server(server.pid, 1)
    return runs


def _serve_chunk(run: CpuRun, load: GatedBatches | FreeLoad, pid: int, count: int) -> None:
    client_start = time.process_time()
    run.served.add(load.run(count, pid))
    run.client_cpu += time.process_time() - client_start


@contextlib.contextmanager
def pinned_to_client_cpu() -> Iterator[bool]:
    """Pin this process (the load generator) to CLIENT_CPU for the block; yield whether it was.

    Without both CPUs available the benchmark still runs, unpinned, and the report says so.
    """
    previous = os.sched_getaffinity(0)
    if not {CLIENT_CPU, SERVER_CPU} <= previous:
        yield False
        return
    os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, previous)


def bench_cpu(settings: argparse.Namespace, directory: Path) -> tuple[list[CpuRun], bool]:
    """*rounds* rounds, each with fresh servers of both implementations."""
    runs: list[CpuRun] = []
    with pinned_to_client_cpu() as pinned:
        for turn in range(settings.rounds):
            progress(f"cpu/request: round {turn + 1}/{settings.rounds}")
            runs += measure_round(turn, settings, SERVER_CPU if pinned else None, directory)
    return runs, pinned


def median_of(runs: list[CpuRun], implementation: str, metric: Callable[[CpuRun], float]) -> float:
    return percentile([metric(run) for run in runs if run.implementation == implementation], 0.5)


def paired_ratios(runs: list[CpuRun]) -> list[float]:
    """prefork / stdlib CPU per request, round by round (each round runs both)."""
    by_turn: dict[int, dict[str, float]] = {}
    for run in runs:
        by_turn.setdefault(run.turn, {})[run.implementation] = run.cpu_us_per_request
    return [ratio(pair[PREFORK], pair[STDLIB]) for _, pair in sorted(by_turn.items())]


def shutdown_lines(results: dict[str, list[float]], trials: int) -> list[str]:
    ours, theirs = percentile(results[PREFORK], 0.5), percentile(results[STDLIB], 0.5)
    return [
        f"`serve_forever()` with the default poll interval ({DEFAULT_POLL_INTERVAL} s) in a thread; `shutdown()` "
        f"from the main thread at a random point of one poll period; time until `shutdown()` returns. {trials} "
        f"trials each, alternating, each pair at the same point.",
        "",
        "| implementation | median | p90 | max |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {' | '.join(_ms(percentile(results[name], q)) for q in (0.5, 0.9, 1.0))} |"
          for name in (STDLIB, PREFORK)),
        "",
        f"**stdlib / prefork (median): {ratio(theirs, ours):,.0f}×**. "
        f"Goal for prefork, median ≤ {SHUTDOWN_GOAL * 1000:.0f} ms: {'met' if ours <= SHUTDOWN_GOAL else 'NOT met'}.",
    ]


def load_description(settings: argparse.Namespace) -> tuple[str, str]:
    """How the load drove the servers, and what one turn of each server is."""
    if settings.load == "gated":
        return (f"Gated load: a gate connection that sends nothing, {settings.batch} connections queued behind "
                f"it with their line sent, then the gate's line; the server drains the batch back to back "
                f"(backlog {backlog(settings)} on both servers). req/s and \"busy\" cover the drains; the load "
                f"generator works while the server waits on the gate.", f"batch ({settings.batch} + its gate)")
    return (f"Free load: {settings.concurrency} connections in flight from one epoll loop, default backlog (5). "
            f"The load generator runs beside the server.", f"{chunk(settings):,} requests")


def cpu_lines(runs: list[CpuRun], settings: argparse.Namespace) -> list[str]:
    of_medians = ratio(median_of(runs, PREFORK, _cpu_us), median_of(runs, STDLIB, _cpu_us))
    paired, (load, turn) = paired_ratios(runs), load_description(settings)
    return [
        f"Plain synchronous `TCPServer` and the same one-line echo handler built on each `StreamRequestHandler`, "
        f"each server in its own process pinned to one CPU; the load generator on the other CPU. Short "
        f"connections: connect, send one line, read the echo until EOF, close. {load} {settings.rounds} rounds; "
        f"in each, fresh servers of both implementations run side by side and take turns every {turn}; "
        f"{settings.warmup:,} warm-up requests each, then {runs[0].served.requests:,} measured each. Server CPU = "
        f"user + system time of the server process over the measured requests (its kernel CPU clock; the "
        f"user/sys split comes from /proc in 10 ms ticks). Figures are medians over the rounds. Absolute figures "
        f"move with the machine's load; the ratio compares both sides under the same conditions.",
        "",
        "| implementation | req/s | server CPU µs/req | user µs/req | sys µs/req | server busy | load generator CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
        _cpu_summary_row(runs, STDLIB),
        _cpu_summary_row(runs, PREFORK),
        "",
        f"**prefork / stdlib CPU per request: {of_medians:.3f}** (ratio of the medians); round by "
        f"round {', '.join(f'{value:.3f}' for value in paired)}. Below 1 means prefork spends less.",
        "",
        "Every round:",
        "",
        "| round | implementation | req/s | server CPU µs/req | server busy | load generator CPU µs/req |",
        "|---:|---|---:|---:|---:|---:|",
        *(_cpu_run_row(run) for run in runs),
    ]


def _cpu_us(run: CpuRun) -> float:
    return run.cpu_us_per_request


def _cpu_summary_row(runs: list[CpuRun], implementation: str) -> str:
    def med(metric: Callable[[CpuRun], float]) -> float:
        return median_of(runs, implementation, metric)

    return (f"| {implementation} | {med(lambda r: r.requests_per_second):,.0f} | {med(_cpu_us):.1f} | "
            f"{med(lambda r: r.us(r.server_user)):.1f} | {med(lambda r: r.us(r.server_system)):.1f} | "
            f"{med(lambda r: r.server_busy):.0%} | {med(lambda r: r.us(r.client_cpu)):.1f} |")


def _cpu_run_row(run: CpuRun) -> str:
    return (
        f"| {run.turn + 1} | {run.implementation} | {run.requests_per_second:,.0f} | "
        f"{run.cpu_us_per_request:.1f} | {run.server_busy:.0%} | {run.us(run.client_cpu):.1f} |"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def render_report(settings: argparse.Namespace, shutdown: dict[str, list[float]], runs: list[CpuRun], pinned: bool) -> str:
    pinning = f"server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}" if pinned else "NOT pinned"
    intro = ("prefork.socketserver against the standard library's socketserver, side by side in one run "
             f"(seed {settings.seed}; p90 interpolates linearly between the closest ranks).")
    lines = [
        *report_head("Benchmarks of the compatible core", settings.argv, intro, f"; {pinning}"),
        "## 1. Shutdown latency", "", *shutdown_lines(shutdown, settings.trials), "",
        "## 2. CPU per request of the synchronous loop", "", *cpu_lines(runs, settings),
    ]
    return "\n".join(lines) + "\n"


# -- the suite's command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, quick: bool) -> None:
    add = parser.add_argument
    add("--trials", type=positive, default=4 if quick else 50, help="shutdown trials per implementation")
    add("--rounds", type=positive, default=1 if quick else 3, help="CPU rounds, each with fresh servers of both")
    add("--warmup", type=positive, default=200 if quick else 2_000, help="unmeasured requests per server")
    add("--requests", type=positive, default=1_000 if quick else 20_000, help="measured requests per server")
    add("--load", choices=("gated", "free"), default="gated", help="how the client drives")
    add("--batch", type=positive, default=100 if quick else DEFAULT_BATCH, help="gated: connections per gate")
    add("--concurrency", type=positive, default=DEFAULT_CONCURRENCY,
        help="free: connections in flight (keep below the backlog of 5)")
    add("--seed", type=int, default=None, help="seed of the shutdown points")


def run(settings: argparse.Namespace, argv: list[str]) -> None:
    if settings.seed is None:
        settings.seed = random.SystemRandom().randrange(1_000_000)
    settings.argv = argv
    progress(f"shutdown latency: {settings.trials} trials per implementation")
    shutdown = bench_shutdown(settings.trials, random.Random(settings.seed))
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        runs, pinned = bench_cpu(settings, Path(tmp))
    write_report(render_report(settings, shutdown, runs, pinned), settings.output)
