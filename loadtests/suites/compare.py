"""prefork against the stdlib, gunicorn and granian: raw TCP, UDP and HTTP, side by side. Runs in: bench.

Run from the repository root, on Linux with two CPUs or more, wrk and gunicorn installed::

    .venv/bin/python -m loadtests.bench compare

It takes about 9 minutes (``--rounds`` × ``--seconds`` per row, two passes), prints the tables and
writes ``docs/benchmarks.md`` and ``docs/benchmarks.png`` (``--output -`` writes neither).

Rules of this suite (beside the harness's, ``loadtests/harness.py``):

1. Every row gets a fresh server and the same load for the same time; the echo handler is the
   same code in every raw row (``loadtests.servers``' ``echo``), the HTTP rows run the same WSGI
   app (``workers.wsgi:hello``) where the server runs WSGI.
2. Server CPU is the sum of user + system time of every process in the server's tree, with the
   time of reaped children (fork per request).
3. Two passes: pinned (load generator on CPU 0, server on CPU 1, with taskset) and unpinned.

Load generators: wrk for HTTP (``-H 'Connection: close'`` for the rows without keep-alive); for
raw TCP and UDP ``loadtests.load.EchoLoad`` in ``--load-processes`` processes. Its CPU is reported
per row: where it is near 100% of its CPU, the load generator and not the server set the pace,
and CPU per request is the figure to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from loadtests.harness import (COMMAND, LOOPBACK, ROOT, percentile, positive, progress, report_head, serving,
                               write_report)
from loadtests.load import (HTTP_CONNECTIONS, REQUEST_TIMEOUT, REQUESTS_PER_CONNECTION, LoadResult, run_echo_load,
                            run_wrk)

OUTPUT = ROOT / "docs" / "benchmarks.md"
LOAD_CPU = 0
SERVER_CPU = 1
# Worker processes of every multi-process server: the machine's two cores.
WORKERS = 2
# Threads per worker in prefork's thread mode and gunicorn's gthread (prefork's default).
THREADS = 16
# Requests in flight. Raw TCP stays at 4: the stdlib servers listen with a backlog of 5
# (request_queue_size), and a connection beyond it has its handshake dropped and retried after
# a second, which would measure the kernel's retransmission timer instead of the server.
TCP_CONCURRENCY = 4
UDP_CONCURRENCY = 8

# The targets of issues 5 and 17: (label, group, numerator row, denominator row, metric, op, bound).
TARGETS = [
    ("TCP short: prefork sync CPU/req ≤ 0.9× naive prefork", "tcp-short", "prefork sync", "naive prefork",
     "cpu", "<=", 0.9),
    ("TCP short: prefork sync req/s ≥ 3.5× stdlib ThreadingTCPServer", "tcp-short", "prefork sync",
     "stdlib ThreadingTCPServer", "rps", ">=", 3.5),
    ("UDP: prefork req/s ≥ 10× stdlib ThreadingUDPServer", "udp", "prefork sync", "stdlib ThreadingUDPServer",
     "rps", ">=", 10.0),
    ("HTTP no keep-alive: prefork --wsgi CPU/req ≤ 0.8× gunicorn sync", "http-close", "prefork --wsgi sync",
     "gunicorn sync", "cpu", "<=", 0.8),
    ("HTTP keep-alive: prefork thread req/s ≥ 1.5× gunicorn gthread", "http-keepalive", "prefork --wsgi thread",
     "gunicorn gthread", "rps", ">=", 1.5),
]

_GROUP_LABELS = {"http-keepalive": "HTTP keep-alive", "http-close": "HTTP no keep-alive"}
# Issue 17's, within a factor of two of a Rust server and further ahead of gunicorn:
# (group, numerator row, denominator row, metric, op, bound); the label is derived.
ISSUE_17_TARGETS = [("http-keepalive", "prefork --wsgi thread", "granian wsgi", "cpu", "<=", 2.0),
                    ("http-close", "prefork --wsgi sync", "granian wsgi", "cpu", "<=", 2.0),
                    ("http-keepalive", "prefork --wsgi thread", "gunicorn gthread", "rps", ">=", 2.0),
                    ("http-close", "prefork --wsgi sync", "gunicorn sync", "cpu", "<=", 0.6)]
TARGETS += [(f"{_GROUP_LABELS[group]}: {top} {'CPU/req' if metric == 'cpu' else 'req/s'} "
             f"{'≤' if op == '<=' else '≥'} {bound:g}× {bottom}", group, top, bottom, metric, op, bound)
            for group, top, bottom, metric, op, bound in ISSUE_17_TARGETS]


@dataclasses.dataclass(frozen=True)
class Row:
    group: str  # tcp-short, tcp-persistent, udp, http-close, http-keepalive
    name: str
    role: str  # loadtests.servers' role
    args: tuple[str, ...]
    workers: int = 0  # worker processes to wait for
    path: str = "/"


def _stdlib(server: str, handler: str = "echo", forks: int = 0) -> tuple[str, ...]:
    return (f'{{"server": "{server}", "handler": "{handler}", "forks": {forks}}}',)


_ECHO = ("run", "loadtests.servers", "--bind", "tcp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0",
         "--workers", str(WORKERS), "--mode")
_WSGI = ("run", "--wsgi", "workers.wsgi:hello", "--bind", "tcp://127.0.0.1:0", "--workers", str(WORKERS), "--mode")
_GUNICORN = ("-w", str(WORKERS), "--threads", str(THREADS), "-b", "127.0.0.1:0", "--log-level", "info",
             "workers.wsgi:hello", "-k")
# Granian (Rust, its own HTTP stack) running the same WSGI app: the fastest server a WSGI user
# can pick (issue 17's yardstick).
_GRANIAN = ("--interface", "wsgi", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", "0",
            "--log-level", "info", "workers.wsgi:hello")

# The rows of each group, as data: (name, role, args, workers[, path]).
TCP: list[tuple[Any, ...]] = [("prefork sync", "prefork-cli", (*_ECHO, "sync"), WORKERS),
       ("prefork thread", "prefork-cli", (*_ECHO, "thread"), WORKERS),
       ("prefork fork", "prefork-cli", (*_ECHO, "fork"), WORKERS),
       ("naive prefork", "stdlib", _stdlib("TCPServer", forks=WORKERS), WORKERS),
       ("stdlib TCPServer", "stdlib", _stdlib("TCPServer"), 0),
       ("stdlib ThreadingTCPServer", "stdlib", _stdlib("ThreadingTCPServer"), 0),
       ("stdlib ForkingTCPServer", "stdlib", _stdlib("ForkingTCPServer"), 0)]
UDP: list[tuple[Any, ...]] = [("prefork sync", "prefork-cli", (*_ECHO, "sync"), WORKERS),
       ("stdlib UDPServer", "stdlib", _stdlib("UDPServer", "datagram"), 0),
       ("stdlib ThreadingUDPServer", "stdlib", _stdlib("ThreadingUDPServer", "datagram"), 0)]
HTTP: list[tuple[Any, ...]] = [("prefork --wsgi sync", "prefork-cli", (*_WSGI, "sync"), WORKERS),
        ("prefork --wsgi thread", "prefork-cli", (*_WSGI, "thread", "--threads", str(THREADS)), WORKERS),
        ("prefork workers.http sync", "prefork-cli",
         ("run", "workers.http", "--bind", "tcp://127.0.0.1:0", "--workers", str(WORKERS)), WORKERS, "/health"),
        ("gunicorn sync", "gunicorn", (*_GUNICORN, "sync"), WORKERS),
        ("gunicorn gthread", "gunicorn", (*_GUNICORN, "gthread"), WORKERS),
        ("granian wsgi", "granian", _GRANIAN, WORKERS),
        ("stdlib ThreadingHTTPServer", "stdlib", _stdlib("ThreadingHTTPServer"), 0)]
GROUPS = {"tcp-short": TCP, "tcp-persistent": TCP, "udp": UDP, "http-close": HTTP, "http-keepalive": HTTP}
ROWS = [Row(group, *row) for group, rows in GROUPS.items() for row in rows]

GROUP_TITLES = {
    "tcp-short": "Raw TCP, short connections (connect, one line, echo, close)",
    "tcp-persistent": f"Raw TCP, persistent connections ({REQUESTS_PER_CONNECTION} lines per connection)",
    "udp": "UDP request/response",
    "http-close": "HTTP without keep-alive (wrk, `Connection: close`)",
    "http-keepalive": "HTTP with keep-alive (wrk)",
}
# The echo load's mode and requests in flight per raw group.
ECHO_MODES = {"tcp-short": ("short", TCP_CONCURRENCY), "tcp-persistent": ("persistent", TCP_CONCURRENCY),
              "udp": ("udp", UDP_CONCURRENCY)}


@dataclasses.dataclass
class Result:
    row: Row
    pinned: bool
    load: LoadResult
    server_cpu: float
    server_user: float = 0.0  # the user-space part of server_cpu

    @property
    def rps(self) -> float:
        return self.load.requests / self.load.wall if self.load.wall else 0.0

    @property
    def cpu_us(self) -> float:
        return self.server_cpu / self.load.requests * 1e6 if self.load.requests else float("inf")

    @property
    def user_us(self) -> float:
        return self.server_user / self.load.requests * 1e6 if self.load.requests else float("inf")

    @property
    def server_busy(self) -> float:
        return self.server_cpu / self.load.wall if self.load.wall else 0.0

    @property
    def load_busy(self) -> float:
        return self.load.load_cpu / self.load.wall if self.load.wall else 0.0


def drive(row: Row, port: int, seconds: float, pinned: bool, processes: int) -> LoadResult:
    """The row's load for *seconds*: wrk for HTTP, the echo load otherwise."""
    cpu = LOAD_CPU if pinned else None
    if row.group.startswith("http"):
        return run_wrk(f"http://{LOOPBACK}:{port}{row.path}", row.group == "http-keepalive", seconds, cpu)
    mode, concurrency = ECHO_MODES[row.group]
    return run_echo_load(mode, (LOOPBACK, port), seconds, concurrency, processes, cpu)


def measure(row: Row, directory: Path, settings: argparse.Namespace, pinned: bool) -> Result:
    with serving(row.role, row.args, directory, row.workers, SERVER_CPU if pinned else None) as server:
        port = server.udp_port if row.group == "udp" else server.tcp_port
        drive(row, port, settings.warmup, pinned, settings.load_processes)
        user, system = server.cpu_times()
        load = drive(row, port, settings.seconds, pinned, settings.load_processes)
        user_after, system_after = server.cpu_times()
        return Result(row, pinned, load, user_after + system_after - user - system, user_after - user)


def run_pass(settings: argparse.Namespace, base: Path, pinned: bool, rows: list[Row] | None = None) -> list[Result]:
    """Every selected row (of *rows*, this suite's by default) *rounds* times, in alternating
    order (A..Z, Z..A, ...); rounds pooled."""
    selected = [row for row in (ROWS if rows is None else rows)
                if not settings.only or any(w in f"{row.group} {row.name}" for w in settings.only)]
    by_row: dict[Row, list[Result]] = {row: [] for row in selected}
    for turn in range(settings.rounds):
        order = selected if turn % 2 == 0 else selected[::-1]
        for index, row in enumerate(order):
            progress(f"{'pinned' if pinned else 'unpinned'} round {turn + 1}/{settings.rounds}, "
                     f"{index + 1}/{len(order)}: {row.group}: {row.name}")
            result = measure(row, base / f"{int(pinned)}-{turn}-{index}", settings, pinned)
            progress(f"  {result.rps:,.0f} req/s, p99 {result.load.p99 * 1000:.2f} ms, {result.load.errors} errors, "
                     f"{result.cpu_us:.1f} µs CPU/req, load generator {result.load_busy:.0%}")
            by_row[row].append(result)
    return [pooled(results) for results in by_row.values()]


def pooled(results: list[Result]) -> Result:
    """The rounds of one row as one: counts, wall and CPU summed; latencies the median round's."""
    load = LoadResult(sum(r.load.requests for r in results), sum(r.load.errors for r in results),
                      sum(r.load.wall for r in results), percentile([r.load.p50 for r in results], 0.5),
                      percentile([r.load.p99 for r in results], 0.5), sum(r.load.load_cpu for r in results))
    return Result(results[0].row, results[0].pinned, load, sum(r.server_cpu for r in results),
                  sum(r.server_user for r in results))


# -- the report ------------------------------------------------------------------------------------


def _find(results: list[Result], group: str, name: str) -> Result | None:
    return next((r for r in results if r.row.group == group and r.row.name == name), None)


def target_lines(results: list[Result]) -> list[str]:
    lines = ["| target | numerator | denominator | ratio | met? |", "|---|---:|---:|---:|---|"]
    for label, group, top, bottom, metric, op, bound in TARGETS:
        a, b = _find(results, group, top), _find(results, group, bottom)
        if a is None or b is None:
            lines.append(f"| {label} | – | – | – | not measured |")
            continue
        x, y = (a.cpu_us, b.cpu_us) if metric == "cpu" else (a.rps, b.rps)
        unit = "µs/req" if metric == "cpu" else "req/s"
        ratio = x / y if y else float("inf")
        met = ratio <= bound if op == "<=" else ratio >= bound
        lines.append(f"| {label} | {x:,.1f} {unit} | {y:,.1f} {unit} | {ratio:.2f}× | {'**met**' if met else 'NOT met'} |")
    return lines


def group_lines(results: list[Result], group: str) -> list[str]:
    load = "wrk" if group.startswith("http") else "load generator"
    lines = [f"| server | req/s | p50 ms | p99 ms | errors | server CPU µs/req | server CPU % | {load} CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in results if r.row.group == group):
        lines.append(f"| {r.row.name} | {r.rps:,.0f} | {r.load.p50 * 1000:.2f} | {r.load.p99 * 1000:.2f} | "
                     f"{r.load.errors} | {r.cpu_us:.1f} | {r.server_busy:.0%} | {r.load_busy:.0%} |")
    return lines


def tools() -> str:
    from importlib.metadata import PackageNotFoundError, version
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout.split(" [")[0]
    found = {}
    for name in ("gunicorn", "granian"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return f"; {wrk.strip() or 'wrk'}; gunicorn {found['gunicorn']}; granian {found['granian']}"


# How to read some rows; true of the mechanisms, whatever the figures of a given run.
READING = [
    ("- **CPU per request is the comparison; req/s only where the load generator is not at its limit.** "
     "With the server pinned to one CPU, every multi-process server shares that CPU, so req/s is "
     "about 1 / (CPU per request); a load generator near 100% of its CPU is what limits that row."),
    ("- **Raw TCP, short connections: the kernel dominates.** Per connection a prefork sync worker makes accept4, "
     "getsockname (the socket constructor's check), 2 recvfrom, sendto, shutdown and close, as the naive pre-fork "
     "does; the naive one adds a poll() per connection, which prefork replaces by taking queued connections in a "
     "batch (`strace -c` of one worker over 3,000 sequential connections: 94 epoll_wait against 3,000 poll). On "
     "loopback the send runs the peer's receive path too, so those calls are most of the CPU (py-spy of a worker: "
     "52% of samples in the send, 26% in recv, under 15% in Python code of either server): the runtime's own "
     "share, where prefork can be leaner, is a few µs of the ~55."),
    ("- **Errors in the HTTP rows without keep-alive** for `http.server`: it closes the connection "
     "after the response, as the client asked, but does not say `Connection: close` in the "
     "response; wrk then counts the close as a read error. The responses were complete (wrk counts "
     "them as requests too). `workers.http` and `workers.wsgi` say it."),
    ("- **Synchronous servers and keep-alive:** a sync worker holds a kept-alive connection until the client "
     "closes it, so with 8 wrk connections and 2 sync workers only 2 connections are served; the others wait and "
     "their requests are not in the latency figures (wrk counts only answered requests). Thread mode serves all of "
     "them. gunicorn's sync worker closes after every response (it does no keep-alive)."),
    ("- **stdlib ThreadingHTTPServer with keep-alive, ~40 ms per request:** `http.server` sends the "
     "headers and the body in two writes without TCP_NODELAY, and Nagle's algorithm waits for the "
     "client's delayed ACK. `workers.http` sets TCP_NODELAY; `workers.wsgi` sends both in one write."),
    ("- **Fork modes** (prefork `--mode fork`, ForkingTCPServer) fork a process per connection: "
     "milliseconds of CPU each, which persistent connections amortise."),
]


def render(passes: dict[str, list[Result]], argv: list[str], settings: argparse.Namespace) -> str:
    lines = [*report_head("Benchmarks: prefork against the stdlib and gunicorn", argv, tools=tools()),
             "## How to reproduce", "", "```sh",
             "apt-get install -y wrk && .venv/bin/pip install -e '.[load]' gunicorn matplotlib",
             f"{COMMAND} compare", "```", "",
             "## Method", "",
             f"Every row: a fresh server, {settings.warmup:g} s of warm-up, then {settings.seconds:g} s measured "
             f"under the same load; {settings.rounds} rounds per pass, the rows in alternating order (A..Z, "
             f"Z..A), pooled: req/s and CPU per request over all rounds' requests, p50 and p99 the median "
             f"of the rounds'. Percentiles of the raw rows interpolate linearly between the closest ranks "
             f"(`loadtests.harness.percentile`, as in every suite); the HTTP rows' are wrk's. "
             f"Multi-process servers run {WORKERS} workers; thread modes {THREADS} threads "
             f"per worker. The echo handler is the same code in every raw row; the HTTP rows serve "
             f"`workers.wsgi:hello` (prefork `--wsgi`, gunicorn), the same bytes from `http.server` "
             f"(stdlib), or `GET /health` of `workers.http`. Raw TCP: {TCP_CONCURRENCY} requests in flight "
             f"(the stdlib's backlog is 5); persistent connections are reopened every "
             f"{REQUESTS_PER_CONNECTION} lines (a synchronous server holds a connection until it closes). "
             f"UDP: {UDP_CONCURRENCY} datagrams in flight. HTTP: wrk, 1 thread, {HTTP_CONNECTIONS} connections. "
             f"Raw load: an epoll client in {settings.load_processes} process(es) of the benchmark. "
             "Server CPU = user + system time of every process of the server (workers, master, reaped "
             "per-request children) over the measured phase, per request: on two cores, where the load "
             "generator takes one, the fair comparison. \"CPU %\" is of one core: a load generator near "
             "100% is what limits req/s in that row. Errors: failed connections, resets, wrong replies, "
             f"requests unanswered after {REQUEST_TIMEOUT:g} s (wrk: socket errors and non-2xx).", ""]
    for title, results in passes.items():
        lines += [f"## Targets ({title})", "", *target_lines(results), ""]
    for title, results in passes.items():
        lines += [f"## Results ({title})", ""]
        for group, heading in GROUP_TITLES.items():
            if any(r.row.group == group for r in results):
                lines += [f"### {heading}", "", *group_lines(results, group), ""]
    lines += ["## Reading the figures", "", *READING, "", "![req/s and server CPU per request](benchmarks.png)", ""]
    return "\n".join(lines)


def chart(passes: dict[str, list[Result]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUP_TITLES if any(r.row.group == g for rs in passes.values() for r in rs)]
    figure, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 8), squeeze=False)
    for column, group in enumerate(groups):
        names = [r.row.name for r in next(iter(passes.values())) if r.row.group == group]
        for line, (metric, label) in enumerate((("rps", "req/s"), ("cpu_us", "server CPU µs/req"))):
            ax = axes[line][column]
            height = 0.8 / len(passes)
            for offset, (title, results) in enumerate(passes.items()):
                values = [getattr(_find(results, group, n), metric) if _find(results, group, n) else 0 for n in names]
                ax.barh([i + offset * height for i in range(len(names))], values, height=height, label=title)
            ax.set_yticks([i + height * (len(passes) - 1) / 2 for i in range(len(names))], names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            if line == 0:
                ax.set_title(group)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)  # clear of the bars
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=90)
    plt.close(figure)


# -- the suite's command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, quick: bool) -> None:
    add = parser.add_argument
    add("--seconds", type=float, default=0.5 if quick else 2.0, help="measured seconds per row and round")
    add("--rounds", type=positive, default=1 if quick else 2, help="times each row runs per pass, pooled")
    add("--warmup", type=float, default=0.2 if quick else 1.0, help="warm-up seconds per row")
    add("--load-processes", type=positive, default=1, help="processes of the raw TCP/UDP load generator")
    add("--passes", choices=("both", "pinned", "unpinned"), default="unpinned" if quick else "both")
    add("--only", nargs="*", default=[], help="rows whose group or name contains one of these words")


def run(settings: argparse.Namespace, argv: list[str]) -> None:
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is required (apt-get install -y {'wrk' if tool == 'wrk' else 'util-linux'})")
    can_pin = {LOAD_CPU, SERVER_CPU} <= os.sched_getaffinity(0)
    passes: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for pinned in [p for p in (True, False) if settings.passes in ("both", "pinned" if p else "unpinned")]:
            if pinned and not can_pin:
                progress("fewer than 2 usable CPUs: the pinned pass is skipped")
                continue
            title = f"pinned: load on CPU {LOAD_CPU}, server on CPU {SERVER_CPU}" if pinned else "unpinned"
            passes[title] = run_pass(settings, Path(tmp), pinned)
    write_report(render(passes, argv, settings), settings.output)
    if settings.output != "-":
        chart(passes, Path(settings.output).with_suffix(".png"))
