"""Benchmarks of the prefork master: accept wake-ups, master CPU, respawn time, preload memory. Runs in: bench.

("bench" is this suite's own process, the load generator; the servers are started through the
harness, ``loadtests/harness.py`` and ``loadtests/servers.py``.)

Run from the repository root, on Linux:

    .venv/bin/python -m loadtests.bench master

About a minute and a half; it prints the report and writes ``docs/benchmarks-master.md`` (``--help``: the options).

The harness's rules hold (``loadtests/harness.py``); figures come from /proc through psutil
(voluntary context switches, CPU times, USS/PSS/RSS) and prefork's scoreboard file.

What is measured:

1. **Accept wake-ups.** 8 idle workers on one listener; N sequential short connections (one at a
   time, so every worker is idle when each arrives). Wake-ups = the sum over the workers of
   their voluntary context switches during the run, minus what the same workers do idle over
   the same wall time, divided by N. prefork (a real master, EPOLLEXCLUSIVE) against the naive
   pre-fork (stdlib ``TCPServer`` forked 8 times, each child in ``serve_forever()`` on the shared
   socket). The same servers with 1 worker give the serving worker's own switches per
   connection, so "8 workers minus 1 worker" is what the other workers cost.
2. **Master CPU under load.** 2 workers, 8 short connections in flight (``loadtests.load.EchoLoad``) for
   ``--load-seconds``; the master's CPU (psutil user+sys, and the scheduler's ns counter from
   /proc/PID/schedstat) against the workers'.
3. **Respawn.** SIGKILL one of 2 workers (always one older than the pool's "died young" age, so
   no crash-loop back-off applies) while the other is held busy by an open connection; the
   scoreboard is polled every millisecond until the new worker's slot is idle, then one
   connection is made, which only the new worker can take. The scoreboard's own timestamps
   (slot claimed just before fork, worker booted) split the time.
4. **Preload and copy-on-write.** ``loadtests.bigapp`` builds ~100 MB of small objects at
   import. 4 workers; each runs three full ``gc.collect()`` (connections held open so that each
   worker gets one); then USS, PSS and RSS of every process. Cases: preload (the master
   freezes the graph), preload with a post_fork hook that calls ``gc.unfreeze()`` (prefork has
   no setting to skip the freeze; this is exactly a master that never froze), and no preload.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import psutil

from loadtests.harness import (ROOT, START_TIMEOUT, Server, percentile, positive, prefork_master, progress,
                               report_head, serving, wait_for, write_report)
from loadtests.load import EchoLoad, holding, request
from prefork.pool import YOUNG_AGE
from prefork.scoreboard import IDLE, Scoreboard, SlotView

OUTPUT = ROOT / "docs" / "benchmarks-master.md"


WAKEUP_WORKERS = 8
# Pause after each reply, so that every worker a connection woke is asleep again before the next
# one arrives ("idle workers"); back to back, the naive servers' losers are still running.
DEFAULT_GAP = 0.001
WARMUP_CONNECTIONS = 50
# Idle time over which the workers' own switches (prefork ticks once a second, the stdlib loop
# polls every 0.5 s) are measured, to be subtracted.
BASELINE_SECONDS = 2.0
LOAD_WORKERS = 2
LOAD_CLIENTS = 8
RESPAWN_WORKERS = 2
# Kill only workers older than this: a younger death counts as a crash and delays the respawn.
RESPAWN_MIN_AGE = YOUNG_AGE + 0.2
RESPAWN_POLL = 0.001
RESPAWN_DEADLINE = 10.0
MEMORY_WORKERS = 4
GC_ROUNDS = 3
MiB = 1024 * 1024


class Servers:
    """Fresh directories for the suite's servers: ``run`` is a ready server for its block."""

    def __init__(self, base: Path) -> None:
        self.base, self._count = base, itertools.count(1)

    def run(self, role: str, workers: int, **options: Any) -> contextlib.AbstractContextManager[Server]:
        directory = self.base / f"s{next(self._count)}-{role}"
        if role == "prefork":
            return prefork_master(directory, workers, **options)
        naive = {"server": "TCPServer", "handler": "pid", "forks": workers}
        return serving("stdlib", [json.dumps(naive)], directory, workers)


# -- 1. accept wake-ups ----------------------------------------------------------------------------


def voluntary_switches(processes: list[psutil.Process]) -> dict[int, int]:
    return {p.pid: p.num_ctx_switches().voluntary for p in processes}


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {pid: after[pid] - before[pid] for pid in before}


@dataclasses.dataclass
class WakeupRun:
    implementation: str
    workers: int
    connections: int
    gap: float
    seconds: float
    switches: dict[int, int]  # by worker pid, during the run
    idle_rate: dict[int, float]  # by worker pid, switches per second when idle
    served: collections.Counter[int]

    def corrected(self, pid: int) -> float:
        return self.switches[pid] - self.idle_rate[pid] * self.seconds

    @property
    def per_connection(self) -> float:
        return sum(self.corrected(pid) for pid in self.switches) / self.connections

    @property
    def idle_baseline(self) -> float:
        return sum(self.idle_rate.values()) * self.seconds

    @property
    def non_serving_per_connection(self) -> float:
        """Wake-ups of workers that served no connection at all, per connection."""
        return sum(self.corrected(pid) for pid in self.switches if not self.served[pid]) / self.connections

    @property
    def busiest_share(self) -> float:
        return max(self.served.values()) / self.connections


def measure_wakeups(group: Server, implementation: str, workers: int, connections: int,
                    gap: float) -> WakeupRun:
    pids = group.worker_pids()
    processes = [psutil.Process(pid) for pid in pids]
    for _ in range(WARMUP_CONNECTIONS):
        request(group.address)
    time.sleep(0.2)  # let the warm-up's last wake-ups settle before the idle baseline
    before_idle = voluntary_switches(processes)
    time.sleep(BASELINE_SECONDS)
    idle = _delta(voluntary_switches(processes), before_idle)
    before = voluntary_switches(processes)
    started = time.monotonic()
    served: collections.Counter[int] = collections.Counter()
    for _ in range(connections):
        served[request(group.address)] += 1
        time.sleep(gap)
    seconds = time.monotonic() - started
    switches = _delta(voluntary_switches(processes), before)
    rates = {pid: count / BASELINE_SECONDS for pid, count in idle.items()}
    return WakeupRun(implementation, workers, connections, gap, seconds, switches, rates, served)


def bench_wakeups(servers: Servers, connections: int, gap: float) -> list[WakeupRun]:
    runs = []
    for workers in (WAKEUP_WORKERS, 1):
        for role in ("prefork", "naive"):
            progress(f"wake-ups: {role}, {workers} worker(s), {connections} connections")
            with servers.run(role, workers) as group:
                runs.append(measure_wakeups(group, role, workers, connections, gap))
    return runs


# -- 2. the master's CPU under load ----------------------------------------------------------------


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def on_cpu_ns(pid: int) -> int:
    """Time the scheduler ran *pid*'s main thread, in ns (exact, unlike the 10 ms CPU ticks)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0])


@dataclasses.dataclass
class MasterCpu:
    seconds: float
    requests: int
    failures: int
    master_cpu: float
    master_on_cpu: float
    master_wakeups: int
    workers_cpu: float

    @property
    def fraction(self) -> float:
        return self.master_on_cpu / self.workers_cpu if self.workers_cpu else float("nan")


def measure_master_cpu(group: Server, seconds: float) -> MasterCpu:
    master = psutil.Process(group.pid)
    workers = [psutil.Process(pid) for pid in group.worker_pids()]
    for _ in range(WARMUP_CONNECTIONS):
        request(group.address)
    load = EchoLoad("short", group.address, LOAD_CLIENTS)
    cpu0, ns0, wake0 = cpu_seconds(master), on_cpu_ns(master.pid), master.num_ctx_switches().voluntary
    workers0 = sum(cpu_seconds(w) for w in workers)
    started = time.monotonic()
    load.run(seconds)
    elapsed = time.monotonic() - started
    return MasterCpu(
        elapsed, len(load.latencies), load.errors,
        master_cpu=cpu_seconds(master) - cpu0,
        master_on_cpu=(on_cpu_ns(master.pid) - ns0) / 1e9,
        master_wakeups=master.num_ctx_switches().voluntary - wake0,
        workers_cpu=sum(cpu_seconds(w) for w in workers) - workers0,
    )


def bench_master_cpu(servers: Servers, seconds: float) -> MasterCpu:
    progress(f"master CPU: {LOAD_WORKERS} workers, {LOAD_CLIENTS} connections in flight, {seconds:.0f} s")
    with servers.run("prefork", LOAD_WORKERS) as group:
        return measure_master_cpu(group, seconds)


# -- 3. from a worker's death to its replacement serving -------------------------------------------


@dataclasses.dataclass
class Respawn:
    """Seconds from the SIGKILL; the first two are the scoreboard's own timestamps."""

    claimed: float  # the master claimed the new slot, just before fork (slot.started)
    booted: float  # the new worker was registered on the listener and idle (slot.last_tick)
    seen_idle: float  # this process saw the idle slot (polling every RESPAWN_POLL)
    served: float  # a reply from the new worker arrived (connection made after seen_idle)
    reply_from_new: bool


def oldest_eligible(group: Server) -> SlotView | None:
    now = time.monotonic()  # CLOCK_MONOTONIC: the scoreboard's clock in every process
    ready = [v for v in group.slots() if v.state_name in ("idle", "busy") and now - v.started >= RESPAWN_MIN_AGE]
    return min(ready, key=lambda v: v.started, default=None)


def _hold_all_but(group: Server, victim: int) -> contextlib.ExitStack:
    """Hold a connection on every worker except (maybe also) *victim*, so none of them can accept."""
    stack = contextlib.ExitStack()
    others = set(group.worker_pids()) - {victim}
    held: set[int] = set()
    for _ in range(RESPAWN_WORKERS + 1):
        if others <= held:
            break
        held.update(int(reply.split()[0]) for reply in stack.enter_context(holding(group.address, b"hold\n", 1)))
    return stack


def _new_idle_worker(group: Server, known: set[int], killed_at: float) -> SlotView:
    """Poll the scoreboard every RESPAWN_POLL s until a worker not in *known* is idle."""
    deadline = killed_at + RESPAWN_DEADLINE
    while time.monotonic() < deadline:
        for view in group.slots():
            if view.pid not in known and view.state == IDLE:
                return view
        time.sleep(RESPAWN_POLL)
    raise RuntimeError(f"no idle replacement within {RESPAWN_DEADLINE}s: {group.slots()}")


def measure_respawn(group: Server) -> Respawn:
    victim = wait_for(lambda: oldest_eligible(group), START_TIMEOUT, "a worker old enough to kill")
    with _hold_all_but(group, victim.pid):
        known = {view.pid for view in group.slots()}
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        new = _new_idle_worker(group, known, killed_at)
        seen = time.monotonic()
        pid = request(group.address)
        served = time.monotonic()
    # last_tick is the boot time until the worker's first turn of its loop, which our request
    # (made after reading the slot) is the earliest thing to cause.
    return Respawn(new.started - killed_at, new.last_tick - killed_at, seen - killed_at,
                   served - killed_at, pid == new.pid)


def bench_respawn(servers: Servers, samples: int) -> list[Respawn]:
    progress(f"respawn: {samples} SIGKILLs of one of {RESPAWN_WORKERS} workers (~{RESPAWN_MIN_AGE / 2:.1f} s each)")
    with servers.run("prefork", RESPAWN_WORKERS) as group:
        return [measure_respawn(group) for _ in range(samples)]


# -- 4. preload and copy-on-write ------------------------------------------------------------------


@dataclasses.dataclass
class Memory:
    """psutil memory_full_info of one process, in bytes."""

    rss: int
    uss: int
    pss: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        info = psutil.Process(pid).memory_full_info()
        return cls(info.rss, info.uss, info.pss)


@dataclasses.dataclass
class MemoryCase:
    name: str
    graph_bytes: int
    master: Memory
    workers: list[Memory]

    @property
    def everyone(self) -> list[Memory]:
        return [self.master, *self.workers]

    def mean(self, field: str) -> float:
        return float(statistics.mean(getattr(w, field) for w in self.workers))

    def total(self, field: str) -> int:
        return sum(getattr(m, field) for m in self.everyone)


MEMORY_CASES = (
    ("preload + gc.freeze (prefork's preload)", {"preload": True}),
    ("preload, gc.unfreeze() after fork", {"preload": True, "post_fork": "loadtests.bigapp:unfreeze"}),
    ("no preload (each worker imports)", {"preload": False}),
)


def collect_in_every_worker(group: Server) -> None:
    """GC_ROUNDS rounds; in each, every worker gets a held connection and runs gc.collect()."""
    for _ in range(GC_ROUNDS):
        with holding(group.address, b"gc\n", MEMORY_WORKERS) as pids:
            if len(set(pids)) != MEMORY_WORKERS:
                raise RuntimeError(f"expected {MEMORY_WORKERS} distinct workers, got {pids}")


def measure_memory(group: Server, name: str) -> MemoryCase:
    collect_in_every_worker(group)
    graph_bytes = request(group.address, b"size")
    workers = [Memory.of(pid) for pid in group.worker_pids()]
    return MemoryCase(name, graph_bytes, Memory.of(group.pid), workers)


def bench_memory(servers: Servers) -> list[MemoryCase]:
    cases = []
    for name, options in MEMORY_CASES:
        progress(f"memory: {name}")
        with servers.run("prefork", MEMORY_WORKERS, app="loadtests.bigapp", **options) as group:
            cases.append(measure_memory(group, name))
    return cases


def _find(runs: list[WakeupRun], implementation: str, workers: int) -> WakeupRun:
    return next(r for r in runs if r.implementation == implementation and r.workers == workers)


def wakeup_lines(runs: list[WakeupRun]) -> list[str]:
    rows = [_wakeup_row(run) for run in runs]
    herd = [f"{name} {_find(runs, name, WAKEUP_WORKERS).per_connection - _find(runs, name, 1).per_connection:+.2f}"
            for name in ("prefork", "naive")]
    return [
        (f"{runs[0].connections:,} sequential short connections (connect, one line, the reply carries the worker's "
         f"pid, close; then a {runs[0].gap * 1000:g} ms pause so that every worker is idle again), "
         f"after {WARMUP_CONNECTIONS} warm-up ones. Switches = voluntary context switches summed over the workers "
         f"during the run; the idle baseline (the same workers over the same wall time, measured "
         f"for {BASELINE_SECONDS:.0f} s just before) is subtracted. \"naive\" is the stdlib `TCPServer` forked N "
         f"times, every child in `serve_forever()` on the shared blocking socket."),
        "",
        ("| server | workers | wall s | switches | idle baseline | **wake-ups / connection** "
         "| of which by workers that served none | workers that served | busiest worker's share |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        (f"What the other {WAKEUP_WORKERS - 1} workers add per connection ({WAKEUP_WORKERS} workers "
         f"minus 1 worker): {', '.join(herd)}."),
    ]


def _fixed(value: float) -> str:
    """Two decimals, without the "-0.00" that a noise-level negative value would print."""
    return f"{round(value, 2) + 0.0:.2f}"


def _wakeup_row(run: WakeupRun) -> str:
    return (f"| {run.implementation} | {run.workers} | {run.seconds:.2f} | {sum(run.switches.values()):,} | "
            f"{run.idle_baseline:.0f} | **{run.per_connection:.2f}** | {_fixed(run.non_serving_per_connection)} | "
            f"{len(run.served)} of {run.workers} | {run.busiest_share:.0%} |")


def master_cpu_lines(m: MasterCpu) -> list[str]:
    return [
        (f"A prefork master with {LOAD_WORKERS} workers; this process keeps {LOAD_CLIENTS} short connections in "
         f"flight (one epoll loop, `loadtests.load.EchoLoad`) for {m.seconds:.1f} s. Master CPU from psutil "
         f"(user+sys, 10 ms ticks) and from /proc/PID/schedstat (ns); workers' CPU is psutil user+sys summed."),
        "",
        ("| requests | req/s | failed | master CPU (psutil) | master on-CPU (schedstat) "
         "| master wake-ups | master CPU per wake-up | workers' CPU | **master / workers** |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| {m.requests:,} | {m.requests / m.seconds:,.0f} | {m.failures} | {m.master_cpu:.3f} s "
         f"| {m.master_on_cpu * 1000:.2f} ms | {m.master_wakeups} ({m.master_wakeups / m.seconds:.1f}/s) "
         f"| {m.master_on_cpu * 1000 / max(1, m.master_wakeups):.2f} ms "
         f"| {m.workers_cpu:.2f} s | **{m.fraction:.4%}** (on-CPU / workers' CPU) |"),
    ]


def _quantiles(values: list[float]) -> tuple[float, float, float, float]:
    return min(values), percentile(values, 0.5), percentile(values, 0.9), max(values)


def respawn_lines(samples: list[Respawn]) -> list[str]:
    rows = []
    for label, values in (("the master claims a slot and forks (scoreboard: slot started)", [s.claimed for s in samples]),
                          ("the new worker listens, idle (scoreboard: boot time)", [s.booted for s in samples]),
                          ("this process sees the idle slot (1 ms polling)", [s.seen_idle for s in samples]),
                          ("**first reply from the new worker**", [s.served for s in samples])):
        low, median, p90, high = _quantiles(values)
        rows.append(f"| {label} | {low * 1000:.1f} | **{median * 1000:.1f}** | {p90 * 1000:.1f} | {high * 1000:.1f} |")
    from_new = sum(s.reply_from_new for s in samples)
    return [
        (f"{len(samples)} times: SIGKILL the oldest of {RESPAWN_WORKERS} workers (always older "
         f"than {RESPAWN_MIN_AGE:.1f} s, so the crash back-off for workers dying within {YOUNG_AGE:.0f} s of their "
         f"start does not apply), the other worker held busy by an open connection; scoreboard polled "
         f"every {RESPAWN_POLL * 1000:.0f} ms until the new worker's slot is idle; then one connection, which only "
         f"the new worker can take. The first two rows are the timestamps that the master and the worker wrote in "
         f"the scoreboard (CLOCK_MONOTONIC, the same clock in every process). Milliseconds from the SIGKILL:"),
        "",
        "| until | min | **median** | p90 | max |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"The reply came from the new worker in {from_new} of {len(samples)} samples.",
    ]


def memory_lines(cases: list[MemoryCase]) -> list[str]:
    graph = cases[0].graph_bytes / MiB
    return [
        (f"`loadtests.bigapp` builds {graph:.0f} MiB of small objects at import (its RSS growth; "
         f"small dicts, each with its own list, three str and a float). {MEMORY_WORKERS} workers; each "
         f"ran a full `gc.collect()` {GC_ROUNDS} times, then memory was read (psutil "
         f"`memory_full_info`). USS: pages only this process maps (what it alone costs); PSS: "
         f"shared pages split between the processes sharing them (the PSS sum is the true total)."),
        "",
        ("| case | worker RSS (mean) | **worker USS (mean)** | USS / RSS | master RSS | master USS "
         "| **total PSS** (master + workers) | total RSS (sum, double-counts sharing) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(_memory_row(case) for case in cases),
    ]


def _memory_row(case: MemoryCase) -> str:
    return (f"| {case.name} | {case.mean('rss') / MiB:.1f} MiB | **{case.mean('uss') / MiB:.1f} MiB** | "
            f"{case.mean('uss') / case.mean('rss'):.0%} | {case.master.rss / MiB:.1f} MiB | "
            f"{case.master.uss / MiB:.1f} MiB | **{case.total('pss') / MiB:.0f} MiB** | {case.total('rss') / MiB:.0f} MiB |")


# How the mechanisms behind the figures work; true whatever the figures of a given run.
READING = [
    ("- **One wake-up per connection, and which worker.** Each prefork worker registers the shared listener in its "
     "own epoll with `EPOLLEXCLUSIVE`. The kernel offers a connection to the listener's waiters in registration "
     "order and stops at the first whose process is waiting in `epoll_wait`; busy workers are skipped, so nothing "
     "waits behind a busy worker. The price is no spreading: under light load the first idle worker in that order "
     "takes nearly every connection (the \"busiest worker's share\" column), while the others sleep (their only "
     "wake-up is the worker loop's 1 s tick, the idle baseline). `max_requests` therefore recycles that worker "
     "much sooner than the others; `reuse_port` spreads by hash instead."),
    ("- **The naive pre-fork's herd.** `poll()` waits non-exclusively: every child waiting in it wakes for each "
     "connection, one wins `accept()`, and the losers block inside `accept()` on the blocking socket (where "
     "`serve_forever()`'s poll interval and `shutdown()` no longer reach them) until a later connection; at any "
     "moment some children are in `poll()` and some in `accept()`, which is why the figure is below the number of "
     "workers but far above 1."),
    ("- **The master is off the request path.** Its only wake-ups under load are its 1 s tick "
     "(reading the scoreboard, checking timeouts and recycling); the connections never touch it."),
    ("- **Respawn.** SIGCHLD wakes the master through its signal pipe at once; it reaps, logs, claims a scoreboard "
     "slot and forks. Most of the rest is the new child's first steps (Python's after-fork hooks, first "
     "copy-on-write page faults, signal and listener setup): no step waits on a timer."),
    ("- **Copy-on-write.** A full collection writes to the GC header of every tracked container (dict, list) it "
     "traverses, so every page holding one is copied into the worker. Pages with no tracked object on them (many "
     "of the str, float, dict key tables and list item arrays: pymalloc gives each size class its own pools) stay "
     "shared, hence a fraction of the graph rather than all of it. `gc.freeze()` before fork moves the graph out "
     "of the collector's reach. It does not make objects immutable: code that reads the graph still writes "
     "reference counts and copies the pages it touches (this app's handler does not)."),
]


# -- 5. the cost of a request's latency record ------------------------------------------------------


@dataclasses.dataclass
class RecordCost:
    observe: float  # seconds per SlotWriter.observe call
    call: float  # seconds per call of an empty function of the same arguments


def bench_record_cost(calls: int) -> RecordCost:
    """What a worker adds per request for the latency histogram: min over 5 repeats of *calls* calls."""
    board = Scoreboard.create(1)
    try:
        board.claim(0, 1, 1)
        writer = board.writer(0)

        def empty(index: int, seconds: float) -> None:
            pass

        cost = RecordCost(min(timeit.repeat(lambda: writer.observe(1, 0.003), number=calls, repeat=5)) / calls,
                          min(timeit.repeat(lambda: empty(1, 0.003), number=calls, repeat=5)) / calls)
        del writer  # the map cannot close while a view of it lives
    finally:
        board.close()
    return cost


@dataclasses.dataclass
class Results:
    wakeups: list[WakeupRun]
    master_cpu: MasterCpu
    respawn: list[Respawn]
    memory: list[MemoryCase]
    record: RecordCost


def summary_lines(r: Results) -> list[str]:
    prefork8, naive8 = _find(r.wakeups, "prefork", WAKEUP_WORKERS), _find(r.wakeups, "naive", WAKEUP_WORKERS)
    frozen, unfrozen, separate = r.memory
    respawn = percentile([s.served for s in r.respawn], 0.5)
    return [
        "| figure | value |",
        "|---|---|",
        (f"| wake-ups per connection, {WAKEUP_WORKERS} idle workers: prefork / naive | "
         f"{prefork8.per_connection:.2f} / {naive8.per_connection:.2f} |"),
        (f"| master CPU under load, share of the workers' | {r.master_cpu.fraction:.4%} "
         f"({r.master_cpu.master_on_cpu * 1000:.1f} ms in {r.master_cpu.seconds:.0f} s) |"),
        f"| worker SIGKILL to the replacement's first reply (median of {len(r.respawn)}) | {respawn * 1000:.1f} ms |",
        (f"| mean worker USS: preload (frozen) / preload unfrozen / no preload | {frozen.mean('uss') / MiB:.1f} / "
         f"{unfrozen.mean('uss') / MiB:.1f} / {separate.mean('uss') / MiB:.1f} MiB |"),
        (f"| total PSS, master + {MEMORY_WORKERS} workers: preload (frozen) / preload unfrozen / no preload | "
         f"{frozen.total('pss') / MiB:.0f} / {unfrozen.total('pss') / MiB:.0f} / {separate.total('pss') / MiB:.0f} MiB |"),
        (f"| a request's latency record (target at most 1 µs): SlotWriter.observe / an empty call | "
         f"{r.record.observe * 1e9:.0f} / {r.record.call * 1e9:.0f} ns |"),
    ]


def render_report(r: Results, argv: list[str]) -> str:
    lines = [
        *report_head("Benchmarks of the prefork master", argv,
                     "Percentiles interpolate linearly between the closest ranks."),
        "## Summary", "", *summary_lines(r), "",
        "## 1. Accept wake-ups per connection", "", *wakeup_lines(r.wakeups), "",
        "## 2. The master's CPU while the workers serve", "", *master_cpu_lines(r.master_cpu), "",
        "## 3. From a worker's death to its replacement serving", "", *respawn_lines(r.respawn), "",
        "## 4. Preload and copy-on-write", "", *memory_lines(r.memory), "",
        "## Reading the figures", "", *READING,
    ]
    return "\n".join(lines) + "\n"


# -- the suite's command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, quick: bool) -> None:
    add = parser.add_argument
    add("--connections", type=positive, default=100 if quick else 2000, help="sequential connections per wake-up run")
    add("--gap-ms", type=float, default=DEFAULT_GAP * 1000, help="pause after each wake-up connection")
    add("--load-seconds", type=float, default=1.0 if quick else 10.0, help="duration of the master-CPU load")
    add("--samples", type=positive, default=2 if quick else 20, help="worker kills for the respawn time")
    add("--record-calls", type=positive, default=10_000 if quick else 200_000, help="calls per repeat of the latency record")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-master-") as tmp:
        servers = Servers(Path(tmp))
        results = Results(
            wakeups=bench_wakeups(servers, args.connections, args.gap_ms / 1000),
            master_cpu=bench_master_cpu(servers, args.load_seconds),
            respawn=bench_respawn(servers, args.samples),
            memory=bench_memory(servers),
            record=bench_record_cost(args.record_calls),
        )
    write_report(render_report(results, argv), args.output)
