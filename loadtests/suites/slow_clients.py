"""Idle and slow clients: a well-behaved client's latency beside them, per worker mode. Runs in: bench.

("bench" is this suite's own process, the clients; the servers are prefork masters started
through the harness, each in its own session.)

Run from the repository root, on Linux:

    .venv/bin/python -m loadtests.bench slow-clients

It takes about half a minute, prints the table and writes it to ``docs/benchmarks-slow-clients.md``
(``--output -`` writes no file; ``--requests`` sets the well-behaved client's requests per row).

Each row: a fresh ``workers.echo`` master with 2 workers and default settings (bar the mode),
then the bad clients of the row (``loadtests/load.py``: connections that send nothing,
and connections that send half a line and stall), optionally one more connection that holds a
worker in its handler (it said a line and stays open: a sync worker serves it until it closes),
then, once the workers hold every bad connection (psutil), the well-behaved client's sequential requests: connect, one line, the echo, close. A
request that fails or takes ``REQUEST_TIMEOUT`` counts as ``REQUEST_TIMEOUT``. Loopback only;
every server is stopped by its process group in a ``finally``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from loadtests.harness import ROOT, percentile, positive, prefork_master, report_head, wait_for, write_report
from loadtests.load import LINE, bad_clients, good_client_latencies, held_by, holding, p99

OUTPUT = ROOT / "docs" / "benchmarks-slow-clients.md"
WORKERS = 2
BAD = 200  # idle connections, and as many stalled ones, in the rows that have them
# A request of the well-behaved client that takes this long counts as failed.
REQUEST_TIMEOUT = 2.0
# The well-behaved client's run ends after this long; requests not made count as timed out.
RUN_BUDGET = 120.0
# Deadline for the workers to take every bad connection (silent ones after TCP_DEFER_ACCEPT's ~1 s).
SETTLE_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str
    idle: int
    stalled: int
    held: bool = False

    @property
    def label(self) -> str:
        bad = f"{self.idle} idle + {self.stalled} stalled" if self.idle or self.stalled else "none"
        return bad + (", one worker held in a handler" if self.held else "")


CASES = (
    Case("sync", 0, 0),
    Case("sync", BAD, BAD),
    Case("sync", BAD, BAD, held=True),
    Case("thread", BAD, BAD),
    Case("fork", 0, 0),
    Case("fork", BAD, BAD),
)


@dataclasses.dataclass
class Row:
    case: Case
    latencies: list[float]

    def line(self) -> str:
        ms = sorted(x * 1000 for x in self.latencies)
        failed = sum(1 for x in self.latencies if x >= REQUEST_TIMEOUT)
        return (f"| {self.case.mode} | {self.case.label} | {len(ms)} | {percentile(ms, 0.5):.2f} | "
                f"**{p99(self.latencies) * 1000:.2f}** | {ms[-1]:.2f} | {failed} |")


def measure(directory: Path, case: Case, requests: int) -> Row:
    with prefork_master(directory, WORKERS, app="workers.echo", mode=case.mode) as group:
        address = group.address
        with bad_clients(address, case.idle, case.stalled), holding(address, LINE, int(case.held)):
            # Measured once the workers hold every bad connection: TCP_DEFER_ACCEPT keeps the
            # silent ones in the kernel for about a second first.
            wait_for(lambda: held_by(group.worker_pids(), address) >= case.idle + case.stalled, SETTLE_TIMEOUT,
                     "the workers to take every bad connection")
            latencies = good_client_latencies(address, requests, REQUEST_TIMEOUT, budget=RUN_BUDGET)
    return Row(case, latencies)


def render(rows: list[Row], argv: list[str]) -> str:
    lines = [
        *report_head("A well-behaved client beside idle and slow clients", argv),
        (f"`workers.echo`, {WORKERS} workers, default settings. Latency of the well-behaved client in "
         f"milliseconds, from connect() to the echo (percentiles interpolate linearly between the closest ranks); "
         f"a request that failed or took {REQUEST_TIMEOUT:g} s counts as {REQUEST_TIMEOUT:g} s (\"failed\"). Issue "
         f"11's bound: p99 at most 100 ms with {BAD} idle and {BAD} stalled connections. Before prefork parked "
         f"connections until their first line, every request of that row failed (the two sync workers sat in the "
         f"handlers of the first two bad connections for echo's 300 s idle timeout)."),
        "",
        "| mode | bad clients | requests | p50 | **p99** | max | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(row.line() for row in rows),
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser, quick: bool) -> None:
    parser.add_argument("--requests", type=positive, default=50 if quick else 1000, help="well-behaved requests per row")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        rows = [measure(Path(tmp) / str(index), case, args.requests) for index, case in enumerate(CASES)]
    write_report(render(rows, argv), args.output)
