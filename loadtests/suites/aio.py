"""asyncio mode against a bare uvloop server and prefork's sync and thread modes. Runs in: bench.

Run from the repository root, on Linux, with uvloop installed (``pip install -e '.[load,uvloop]'``)::

    .venv/bin/python -m loadtests.bench asyncio

It prints the tables and writes ``docs/benchmarks-asyncio.md`` (``--output -``: none; ``--quick``:
small counts, no file). Rules (beside the harness's, ``loadtests/harness.py``):

1. Every row is measured as the ``compare`` suite measures its raw rows (``compare.measure``: a
   fresh server, a warm-up, then the same ``loadtests.load.EchoLoad`` for the same time, the same
   requests in flight): keep-alive echo (persistent TCP connections), UDP echo, short TCP
   (connect, one line, close). Server CPU is the whole server tree's user + system time. Each
   row runs ``--rounds`` times in alternating order (``compare.run_pass``), pooled, with the
   load generator and the server pinned to CPUs of their own where the machine has two.
2. The rows, as data below: prefork ``--mode asyncio`` serving ``workers.echo`` (a
   StreamReader/StreamWriter handler class, and a DatagramProtocol) with 2 workers; serving the
   bare server's own code (``loadtests/uvloop_echo.py``): its Protocols with 2 workers and with
   1, its streams handler with 2; the bare uvloop server itself: Protocols in 1 process and in 2
   with SO_REUSEPORT, the streams handler in 2; prefork sync and thread (``loadtests.servers``'
   echo, as in the ``compare`` suite). Each row is set beside the 1-process bare server (the
   issue's reference) and beside its bare counterpart: as many processes, the same handler
   code (``SAME_PROCESSES``).
4. Server CPU is also split into user and system time. A prefork row and its bare counterpart
   make the same system calls per request (strace -c: recvmsg and sendmsg per datagram; read,
   write and epoll_pwait per keep-alive message), so the kernel's part is the same work, and
   the difference of their user time per request is what prefork adds. Set against the
   counterpart's whole CPU per request, it is prefork's cost without the system time's noise,
   which on a shared VM moves a row's CPU by a tenth from run to run.
3. Idle connections: a fresh asyncio master with 2 workers holds IDLE idle connections (the
   bench raises its own open-files limit to the hard limit; the master raises the workers');
   memory per idle connection is the workers' USS growth divided by IDLE; then an active
   client's sequential short requests give its p99 beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
from pathlib import Path

import psutil

from loadtests.harness import ROOT, positive, prefork_master, progress, report_head, wait_for, write_report
from loadtests.load import REQUEST_TIMEOUT, bad_clients, good_client_latencies, p99
from loadtests.suites import compare

OUTPUT = ROOT / "docs" / "benchmarks-asyncio.md"
WORKERS = 2
# The groups of the compare suite that this one runs (its load, concurrency and measure()).
GROUP_TITLES = {"tcp-persistent": "Keep-alive echo (persistent TCP connections)", "udp": "UDP echo",
                "tcp-short": "Short TCP (connect, one line, echo, close)"}
# Issue 15's bounds.
CPU_BOUND = 1.15  # keep-alive and UDP CPU per request, against the bare uvloop server (1 process)
MEMORY_BOUND = 10 * 1024  # bytes per idle connection
P99_BOUND = 0.005  # an active client's p99 beside the idle connections
# Connections opened and held before the measurement: their one-time allocations are not counted.
WARM = 20
# Deadline for the workers to hold every idle connection.
SETTLE_TIMEOUT = 60.0

_ECHO = ("run", "--bind", "tcp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0", "--workers", str(WORKERS))


# The rows, as data: (name, loadtests.servers' role, its arguments, processes to wait for besides the first).
RAW: list[tuple[str, str, tuple[str, ...], int]] = [
    ("prefork asyncio (2 workers)", "prefork-cli", (*_ECHO[:1], "workers.echo", *_ECHO[1:], "--mode", "asyncio"),
     WORKERS),
    ("prefork asyncio, the bare server's Protocols (2 workers)", "prefork-cli",
     (*_ECHO[:1], "loadtests.uvloop_echo", *_ECHO[1:], "--mode", "asyncio"), WORKERS),
    ("prefork asyncio, the bare server's streams handler (2 workers)", "prefork-cli",
     (*_ECHO[:1], "loadtests.uvloop_echo:streams", *_ECHO[1:], "--mode", "asyncio"), WORKERS),
    ("prefork asyncio, the bare server's Protocols (1 worker)", "prefork-cli",
     (*_ECHO[:1], "loadtests.uvloop_echo", *_ECHO[1:-1], "1", "--mode", "asyncio"), 1),
    ("bare uvloop Protocol, 1 process", "uvloop", (json.dumps({"processes": 1}),), 0),
    ("bare uvloop Protocol, 2 processes (SO_REUSEPORT)", "uvloop", (json.dumps({"processes": 2}),), 1),
    ("bare uvloop, asyncio streams handler, 2 processes (SO_REUSEPORT)", "uvloop",
     (json.dumps({"processes": 2, "streams": True}),), 1),
    ("prefork sync (2 workers)", "prefork-cli", (*_ECHO[:1], "loadtests.servers", *_ECHO[1:], "--mode", "sync"),
     WORKERS),
    ("prefork thread (2 workers)", "prefork-cli", (*_ECHO[:1], "loadtests.servers", *_ECHO[1:], "--mode", "thread"),
     WORKERS),
]
ROWS = [compare.Row(group, *row) for group in GROUP_TITLES for row in RAW]
REFERENCE = "bare uvloop Protocol, 1 process"
# Each row beside the bare server with as many processes: what prefork itself costs per request.
# (Two processes cost more per request than one on this two-core machine even for the bare
# server: each takes fewer events per wake-up, and they share the cores with the load.)
# workers.echo's own handler (a handler class reading pieces of lines) has no bare counterpart.
SAME_PROCESSES = {
    "prefork asyncio, the bare server's Protocols (2 workers)": "bare uvloop Protocol, 2 processes (SO_REUSEPORT)",
    "prefork asyncio, the bare server's streams handler (2 workers)":
        "bare uvloop, asyncio streams handler, 2 processes (SO_REUSEPORT)",
    "prefork asyncio, the bare server's Protocols (1 worker)": REFERENCE,
    "prefork sync (2 workers)": "bare uvloop Protocol, 2 processes (SO_REUSEPORT)",
    "prefork thread (2 workers)": "bare uvloop Protocol, 2 processes (SO_REUSEPORT)",
}


@dataclasses.dataclass
class IdleResult:
    connections: int
    bytes_each: float
    latencies: list[float]


def measure_idle(directory: Path, count: int, requests: int) -> IdleResult:
    _raise_open_files(count + 1000)
    with prefork_master(directory, WORKERS, app="workers.echo", mode="asyncio") as master:
        pids = master.worker_pids()
        with bad_clients(master.address, WARM, 0):  # the first connections' one-time allocations
            wait_for(lambda: sum(view.active for view in master.slots()) >= WARM, SETTLE_TIMEOUT, "warm-up")
            before = _uss(pids)
            with bad_clients(master.address, count, 0):
                wait_for(lambda: sum(view.active for view in master.slots()) >= WARM + count, SETTLE_TIMEOUT,
                         f"the workers to hold {count} connections")
                after = _uss(pids)
                latencies = good_client_latencies(master.address, requests, REQUEST_TIMEOUT)
    return IdleResult(count, (after - before) / count, latencies)


def _uss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_full_info().uss for pid in pids)


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def render(results: list[compare.Result], idle: IdleResult, argv: list[str], args: argparse.Namespace) -> str:
    placement = (f"pinned: the load generator on CPU {compare.LOAD_CPU}, every server process on CPU "
                 f"{compare.SERVER_CPU} (so that the server's CPU per request does not depend on how it shares "
                 f"the two cores with the load)" if args.pinned else "unpinned: server and load on any CPU")
    lines = [*report_head("asyncio mode: prefork's event-loop workers against a bare uvloop server", argv),
             (f"Every row: a fresh server, {args.warmup:g} s of warm-up, {args.seconds:g} s measured, "
              f"{args.rounds} rounds in alternating order, pooled; {placement}. "
              f"Server CPU per request is the whole server tree's; the target of issue 15 is at most "
              f"{CPU_BOUND:g}× the bare uvloop server's for keep-alive and UDP. Each row is set beside the bare "
              f"server in 1 process and beside its bare counterpart: the bare server with as many processes as "
              f"the row has workers and the same handler code (`workers.echo`'s own handler class has "
              f"none). The second ratio is what prefork costs; the first adds what a second process "
              f"and asyncio's streams cost on this machine (the bare rows show those parts alone). "
              f"The last column is that cost without the system time's noise (rule 4 of the suite): a row "
              f"and its counterpart make the same system calls per request, so the user time it adds is "
              f"what prefork adds, here as a share of the counterpart's CPU per request."), ""]
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results if r.row.group == group]
        if not rows:
            continue  # left out with --only
        reference = next((r for r in rows if r.row.name == REFERENCE), None)
        lines += [f"## {title}", "", f"{compare.ECHO_MODES[group][1]} requests in flight.", "",
                  "| server | req/s | p50 ms | p99 ms | errors | **CPU µs/req** | user µs/req | × bare uvloop, "
                  "1 process | × its bare counterpart | user µs/req added, ÷ the counterpart's CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by_name = {r.row.name: r for r in rows}
        for r in rows:
            same = by_name.get(SAME_PROCESSES.get(r.row.name, ""))
            lines.append(f"| {r.row.name} | {r.rps:,.0f} | {r.load.p50 * 1000:.2f} | {r.load.p99 * 1000:.2f} | "
                         f"{r.load.errors} | **{r.cpu_us:.1f}** | {r.user_us:.2f} | {_ratio(r, reference)} | "
                         f"{_ratio(r, same)} | {_added(r, same)} |")
        lines.append("")
    lines += ["## Idle connections", "",
              f"A fresh `workers.echo` master, `--mode asyncio`, {WORKERS} workers, holding {idle.connections:,} idle "
              f"connections; then {len(idle.latencies)} sequential short requests of an active client. Bounds: "
              f"{MEMORY_BOUND // 1024} KiB per idle connection, p99 {P99_BOUND * 1000:g} ms.", "",
              "| idle connections | KiB per idle connection (workers' USS) | active client p50 ms | **p99 ms** |",
              "|---:|---:|---:|---:|",
              f"| {idle.connections:,} | {idle.bytes_each / 1024:.1f} | {sorted(idle.latencies)[len(idle.latencies) // 2] * 1000:.2f} "
              f"| **{p99(idle.latencies) * 1000:.2f}** |", ""]
    return "\n".join(lines)


def _added(result: compare.Result, counterpart: compare.Result | None) -> str:
    """Rule 4: the user time per request a row adds to its bare counterpart, as a share of the
    counterpart's whole CPU per request."""
    if counterpart is None or not counterpart.cpu_us:
        return "-"
    return f"{(result.user_us - counterpart.user_us) / counterpart.cpu_us:+.1%}"


def _ratio(result: compare.Result, reference: compare.Result | None) -> str:
    return f"{result.cpu_us / reference.cpu_us:.2f}" if reference and reference.cpu_us else "-"


def add_arguments(parser: argparse.ArgumentParser, quick: bool) -> None:
    add = parser.add_argument
    add("--seconds", type=float, default=0.5 if quick else 5.0, help="measured seconds per row")
    add("--warmup", type=float, default=0.2 if quick else 1.0, help="warm-up seconds per row")
    add("--idle", type=positive, default=500 if quick else 10_000, help="idle connections held by the workers")
    add("--requests", type=positive, default=100 if quick else 1000, help="the active client's requests")
    add("--load-processes", type=positive, default=1, help="processes of the echo load generator")
    add("--rounds", type=positive, default=1 if quick else 3, help="times each row runs, pooled")
    add("--unpinned", action="store_true", help="server and load generator on any CPU (default: pinned apart)")
    add("--only", nargs="*", default=[], help="rows whose group or name contains one of these words")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    args.pinned = not args.unpinned and {compare.LOAD_CPU, compare.SERVER_CPU} <= os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="bench-asyncio-") as tmp:
        results = compare.run_pass(args, Path(tmp), args.pinned, ROWS)
        progress(f"idle: {args.idle} connections")
        idle = measure_idle(Path(tmp) / "idle", args.idle, args.requests)
    write_report(render(results, idle, argv, args), args.output)

