"""prefork against the stdlib and gunicorn: raw TCP, UDP and HTTP, side by side. Runs in: bench.

("bench" is this script's process and the load generators it starts; the servers run in
sessions of their own, see ``loadtests/bench_servers.py``.)

Run from the repository root, on Linux with two CPUs or more, wrk and gunicorn installed::

    .venv/bin/python -m loadtests.bench

It takes about 9 minutes (``--rounds`` × ``--seconds`` per row, two passes), prints the tables and writes
``docs/benchmarks.md`` and ``docs/benchmarks.png`` (``--output -`` writes neither).

Rules of this script:

1. Every row gets a fresh server and the same load for the same time; the echo handler is the
   same code in every row (``bench_servers.echo_stream`` / ``echo_datagram``), the HTTP rows run
   the same WSGI app (``workers.wsgi:hello``) where the server runs WSGI.
2. Loopback only; every server binds port 0 and the port is read back; every wait has a
   deadline; every server runs in its own session and is stopped by its process group (TERM,
   then KILL) in a ``finally``, and stops by itself after ``SERVER_LIFETIME`` anyway.
3. Server CPU is read from outside: the sum of user + system time of every process in the
   server's tree, with the time of reaped children (fork per request), from /proc via psutil.
4. Two passes: pinned (load generator on CPU 0, server on CPU 1, with taskset) and unpinned.

Load generators: wrk for HTTP (``-H 'Connection: close'`` for the rows without keep-alive); for
raw TCP and UDP an epoll client in ``--load-processes`` processes of this script (non-blocking
sockets, ``--concurrency`` requests in flight). Its CPU is reported per row: where it is near
100% of its CPU, the load generator and not the server set the pace, and CPU per request is the
figure to compare.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import datetime
import errno
import json
import multiprocessing
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import psutil

from loadtests.bench_core import cpu_model
from loadtests.common import positive, stop_process_group

COMMAND = ".venv/bin/python -m loadtests.bench"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
LOOPBACK = "127.0.0.1"

LOAD_CPU = 0
SERVER_CPU = 1
# Worker processes of every multi-process server: the machine's two cores.
WORKERS = 2
# Threads per worker in prefork's thread mode and gunicorn's gthread (prefork's default).
THREADS = 16
# A server stops by itself after this long, whatever happens to the benchmark (rule 2).
SERVER_LIFETIME = 900
START_TIMEOUT = 30.0
# Requests in flight. Raw TCP stays at 4: the stdlib servers listen with a backlog of 5
# (request_queue_size), and a connection beyond it has its handshake dropped and retried after
# a second, which would measure the kernel's retransmission timer instead of the server.
TCP_CONCURRENCY = 4
UDP_CONCURRENCY = 8
HTTP_CONNECTIONS = 8
# A persistent connection is closed and reopened after this many requests: a synchronous server
# serves one connection at a time, and connections that never close would starve the others.
REQUESTS_PER_CONNECTION = 100
# A request without an answer after this long is an error (a lost datagram, a stuck connection).
REQUEST_TIMEOUT = 2.0
# No load phase makes more requests than this, whatever the duration.
MAX_REQUESTS = 2_000_000
LINE = b"ping from loadtests.bench\n"

# The targets of issue 5: (label, group, numerator row, denominator row, metric, op, bound).
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


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return value


# -- the rows --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    group: str  # tcp-short, tcp-persistent, udp, http-close, http-keepalive
    name: str
    kind: str  # prefork, stdlib, gunicorn
    args: tuple[str, ...]  # prefork/gunicorn: the command line; stdlib: (role, workers)
    path: str = "/"


def _prefork(*args: str) -> tuple[str, ...]:
    return ("loadtests.bench_servers", "--bind", "tcp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0",
            "--workers", str(WORKERS), *args)


def _wsgi(*args: str) -> tuple[str, ...]:
    return ("--wsgi", "workers.wsgi:hello", "--bind", "tcp://127.0.0.1:0", "--workers", str(WORKERS), *args)


def _gunicorn(worker_class: str) -> tuple[str, ...]:
    return ("-w", str(WORKERS), "-k", worker_class, "--threads", str(THREADS), "-b", "127.0.0.1:0",
            "--log-level", "info", "workers.wsgi:hello")


def rows() -> list[Row]:
    tcp = [("prefork sync", "prefork", _prefork("--mode", "sync")),
           ("prefork thread", "prefork", _prefork("--mode", "thread")),
           ("prefork fork", "prefork", _prefork("--mode", "fork")),
           ("naive prefork", "stdlib", ("naive-prefork", str(WORKERS))),
           ("stdlib TCPServer", "stdlib", ("stdlib-tcp", "1")),
           ("stdlib ThreadingTCPServer", "stdlib", ("stdlib-threading-tcp", "1")),
           ("stdlib ForkingTCPServer", "stdlib", ("stdlib-forking-tcp", "1"))]
    udp = [("prefork sync", "prefork", _prefork("--mode", "sync")),
           ("stdlib UDPServer", "stdlib", ("stdlib-udp", "1")),
           ("stdlib ThreadingUDPServer", "stdlib", ("stdlib-threading-udp", "1"))]
    http = [("prefork --wsgi sync", "prefork", _wsgi("--mode", "sync"), "/"),
            ("prefork --wsgi thread", "prefork", _wsgi("--mode", "thread", "--threads", str(THREADS)), "/"),
            ("prefork workers.http sync", "prefork",
             ("workers.http", "--bind", "tcp://127.0.0.1:0", "--workers", str(WORKERS)), "/health"),
            ("gunicorn sync", "gunicorn", _gunicorn("sync"), "/"),
            ("gunicorn gthread", "gunicorn", _gunicorn("gthread"), "/"),
            ("stdlib ThreadingHTTPServer", "stdlib", ("stdlib-http", "1"), "/")]
    out = [Row(group, name, kind, args) for group in ("tcp-short", "tcp-persistent") for name, kind, args in tcp]
    out += [Row("udp", name, kind, args) for name, kind, args in udp]
    out += [Row(group, name, kind, args, path) for group in ("http-close", "http-keepalive")
            for name, kind, args, path in http]
    return out


GROUP_TITLES = {
    "tcp-short": "Raw TCP, short connections (connect, one line, echo, close)",
    "tcp-persistent": f"Raw TCP, persistent connections ({REQUESTS_PER_CONNECTION} lines per connection)",
    "udp": "UDP request/response",
    "http-close": "HTTP without keep-alive (wrk, `Connection: close`)",
    "http-keepalive": "HTTP with keep-alive (wrk)",
}


# -- a server under test ---------------------------------------------------------------------------

_PREFORK_SERVING = re.compile(r"serving (?:tcp://127\.0\.0\.1:(\d+))?(?:, )?(?:udp://127\.0\.0\.1:(\d+))?")
_PREFORK_READY = re.compile(r"ready: (\d+) workers ready")
_GUNICORN_PORT = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_GUNICORN_WORKER = re.compile(r"Booting worker with pid")


class Server:
    """One server in a session of its own (optionally pinned), its ports and its CPU."""

    def __init__(self, row: Row, directory: Path, pinned: bool) -> None:
        self.row = row
        self.ready_file = directory / "ready.json"
        self.log_path = directory / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop())
        argv = [sys.executable, "-m", "loadtests.bench_servers"]
        if row.kind == "stdlib":
            argv += [row.args[0], str(self.ready_file), str(SERVER_LIFETIME), row.args[1]]
        else:
            argv += [row.kind, str(SERVER_LIFETIME), *(("run",) if row.kind == "prefork" else ()), *row.args]
        if pinned:
            argv = ["taskset", "-c", str(SERVER_CPU), *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFORK_", "GUNICORN_"))}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.tcp_port = self.udp_port = 0

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> Server:
        wait_for(self._ready, START_TIMEOUT, f"{self.row.name} to serve")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.row.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        if self.row.kind == "stdlib":
            if not self.ready_file.exists():
                return False
            self.tcp_port = self.udp_port = json.loads(self.ready_file.read_text())["port"]
            return True
        text = self.log()
        if self.row.kind == "prefork":
            serving, ready = _PREFORK_SERVING.search(text), _PREFORK_READY.search(text)
            if not (serving and ready):
                return False
            self.tcp_port, self.udp_port = int(serving.group(1) or 0), int(serving.group(2) or 0)
            return True
        port = _GUNICORN_PORT.search(text)
        if not port or len(_GUNICORN_WORKER.findall(text)) < WORKERS:
            return False
        self.tcp_port = int(port.group(1))
        return True

    def cpu_seconds(self) -> float:
        """User + system time of the whole tree, reaped children included (rule 3)."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for proc in tree:
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue  # a per-request child that just exited: its parent will count it once reaped
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def stop(self) -> None:
        stop_process_group(self.proc.pid)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass  # stop_process_group sent KILL; the zombie is reaped with this process
        self._log.close()


# -- the raw TCP / UDP load generator --------------------------------------------------------------


class _Slot:
    """One request in flight: its socket, start time, what it waits for."""

    __slots__ = ("sock", "started", "buffer", "used", "expected", "connected")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.buffer = b""
        self.used = 0
        self.expected = LINE
        self.connected = False


class EchoLoad:
    """An epoll loop keeping *concurrency* echo requests in flight (mode short, persistent or udp)."""

    def __init__(self, mode: str, port: int, concurrency: int) -> None:
        self.mode, self.address, self.concurrency = mode, (LOOPBACK, port), concurrency
        self.epoll = select.epoll()
        self.slots: dict[int, _Slot] = {}
        self.latencies = array.array("d")
        self.errors = 0
        self.sequence = 0

    def run(self, seconds: float, max_requests: int) -> None:
        deadline = time.monotonic() + seconds
        for _ in range(self.concurrency):
            self._open(_Slot())
        next_check = time.monotonic() + REQUEST_TIMEOUT / 4
        while len(self.latencies) < max_requests:
            for fd, events in self.epoll.poll(0.1):
                slot = self.slots.get(fd)
                if slot is not None:
                    self._event(fd, slot, events)
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_check:
                self._expire(time.perf_counter())
                next_check = now + REQUEST_TIMEOUT / 4
        for slot in list(self.slots.values()):
            self._close(slot)
        self.epoll.close()

    # -- requests

    def _open(self, slot: _Slot) -> None:
        kind = socket.SOCK_DGRAM if self.mode == "udp" else socket.SOCK_STREAM
        slot.sock = socket.socket(socket.AF_INET, kind | socket.SOCK_NONBLOCK)
        slot.used, slot.buffer, slot.connected = 0, b"", kind == socket.SOCK_DGRAM
        slot.started = time.perf_counter()
        code = slot.sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            self.errors += 1
            slot.sock.close()
            raise ConnectionError(code, os.strerror(code))
        self.slots[slot.sock.fileno()] = slot
        if code == 0:
            slot.connected = True
            self.epoll.register(slot.sock.fileno(), select.EPOLLIN)
            self._send(slot, fresh=False)
        else:
            self.epoll.register(slot.sock.fileno(), select.EPOLLOUT)

    def _send(self, slot: _Slot, fresh: bool = True) -> None:
        assert slot.sock is not None
        if fresh:
            slot.started = time.perf_counter()
        if self.mode == "udp":
            self.sequence += 1
            slot.expected = b"%d " % self.sequence + LINE
        slot.sock.send(slot.expected)  # far below an empty socket buffer: never partial

    def _event(self, fd: int, slot: _Slot, events: int) -> None:
        assert slot.sock is not None
        try:
            if not slot.connected:
                slot.connected = True
                self.epoll.modify(fd, select.EPOLLIN)
                self._send(slot, fresh=False)
                return
            data = slot.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._fail(slot)
            return
        if self.mode == "udp":
            if data == slot.expected:
                self._done(slot)
            return  # a late reply to an expired request: ignore it
        if not data:
            self._fail(slot)
            return
        slot.buffer += data
        if len(slot.buffer) >= len(LINE):
            if slot.buffer != LINE:
                self._fail(slot)
            else:
                self._done(slot)

    def _done(self, slot: _Slot) -> None:
        self.latencies.append(time.perf_counter() - slot.started)
        slot.used += 1
        slot.buffer = b""
        if self.mode == "short" or (self.mode == "persistent" and slot.used >= REQUESTS_PER_CONNECTION):
            self._close(slot)
            self._open(slot)
        else:
            self._send(slot)

    def _fail(self, slot: _Slot) -> None:
        self.errors += 1
        self._close(slot)
        self._open(slot)

    def _close(self, slot: _Slot) -> None:
        if slot.sock is not None:
            self.slots.pop(slot.sock.fileno(), None)
            slot.sock.close()  # closing the fd also removes it from the epoll set
            slot.sock = None

    def _expire(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if now - slot.started > REQUEST_TIMEOUT:
                if self.mode == "udp":
                    self.errors += 1  # the datagram or its reply was lost: send a new one
                    self._send(slot)
                else:
                    self._fail(slot)


def _load_process(mode: str, port: int, concurrency: int, seconds: float, pin: bool, out: Connection) -> None:
    """Called in the child: pin, run the load, send back latencies, errors, wall and CPU time."""
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})
    load = EchoLoad(mode, port, concurrency)
    start_wall, start_cpu = time.monotonic(), time.process_time()
    load.run(seconds, MAX_REQUESTS)
    out.send((load.latencies.tobytes(), load.errors, time.monotonic() - start_wall,
              time.process_time() - start_cpu))
    out.close()


@dataclasses.dataclass
class LoadResult:
    requests: int
    errors: int
    wall: float
    p50: float  # seconds
    p99: float
    load_cpu: float  # seconds of CPU the load generator used


def run_echo_load(mode: str, port: int, seconds: float, pinned: bool, processes: int) -> LoadResult:
    """*processes* load processes (fork), concurrency shared out between them; results merged."""
    context = multiprocessing.get_context("fork")
    concurrency = UDP_CONCURRENCY if mode == "udp" else TCP_CONCURRENCY
    children = []
    for index in range(processes):
        share = concurrency // processes + (1 if index < concurrency % processes else 0)
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_load_process, args=(mode, port, max(share, 1), seconds, pinned, send),
                                daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    latencies, errors, walls, cpu = array.array("d"), 0, [], 0.0
    for child, receive in children:
        if not receive.poll(seconds + START_TIMEOUT):
            child.kill()
            raise RuntimeError(f"a load process did not report within {seconds + START_TIMEOUT:.0f} s")
        data, child_errors, wall, child_cpu = receive.recv()
        child.join(START_TIMEOUT)
        latencies.frombytes(data)
        errors, cpu = errors + child_errors, cpu + child_cpu
        walls.append(wall)
    ordered = sorted(latencies)
    return LoadResult(len(ordered), errors, max(walls), _quantile(ordered, 0.5), _quantile(ordered, 0.99), cpu)


def _quantile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


# -- wrk -------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(port: int, path: str, keepalive: bool, seconds: float, pinned: bool) -> LoadResult:
    # wrk takes whole seconds only.
    argv = ["wrk", "-t", "1", "-c", str(HTTP_CONNECTIONS), "-d", f"{max(1, round(seconds))}s", "--timeout", f"{REQUEST_TIMEOUT:g}s",
            "--latency", f"http://{LOOPBACK}:{port}{path}"]
    if not keepalive:
        argv[1:1] = ["-H", "Connection: close"]
    if pinned:
        argv = ["taskset", "-c", str(LOAD_CPU), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=seconds + START_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_process_group(proc.pid)
        raise RuntimeError(f"wrk did not finish: {' '.join(argv)}") from None
    return parse_wrk(out.decode(errors="replace"), _children_cpu_since_last())


_last_children_cpu = [0.0]
# The 1-minute load average when the run started, for the report.
LOAD_BEFORE = [0.0]


def _children_cpu_since_last() -> float:
    """CPU of this process's waited-for children since the last call (wrk, via getrusage)."""
    times = os.times()
    total = times.children_user + times.children_system
    delta, _last_children_cpu[0] = total - _last_children_cpu[0], total
    return delta


def parse_wrk(text: str, load_cpu: float) -> LoadResult:
    def value(pattern: str) -> str:
        found = re.search(pattern, text)
        if not found:
            raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{text}")
        return found.group(1)

    def latency(percent: str) -> float:
        number, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M).groups()  # type: ignore[union-attr]
        return float(number) * _UNITS[unit]

    requests = int(value(r"(\d+) requests in"))
    wall_number, wall_unit = re.search(r"requests in ([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors += int(non2xx.group(1)) if non2xx else 0
    return LoadResult(requests, errors, float(wall_number) * _UNITS[wall_unit], latency("50"), latency("99"), load_cpu)


# -- one row ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    row: Row
    pinned: bool
    load: LoadResult
    server_cpu: float

    @property
    def rps(self) -> float:
        return self.load.requests / self.load.wall if self.load.wall else 0.0

    @property
    def cpu_us(self) -> float:
        return self.server_cpu / self.load.requests * 1e6 if self.load.requests else float("inf")

    @property
    def server_busy(self) -> float:
        return self.server_cpu / self.load.wall if self.load.wall else 0.0

    @property
    def load_busy(self) -> float:
        return self.load.load_cpu / self.load.wall if self.load.wall else 0.0


def measure(row: Row, directory: Path, settings: argparse.Namespace, pinned: bool) -> Result:
    server = Server(row, directory, pinned)
    try:
        server.wait_ready()
        drive = _driver(row, server, settings, pinned)
        drive(settings.warmup)
        before = server.cpu_seconds()
        load = drive(settings.seconds)
        used = server.cpu_seconds() - before
    finally:
        server.stop()
    return Result(row, pinned, load, used)


def _driver(row: Row, server: Server, settings: argparse.Namespace, pinned: bool) -> Callable[[float], LoadResult]:
    if row.group.startswith("http"):
        keepalive = row.group == "http-keepalive"
        _children_cpu_since_last()
        return lambda seconds: run_wrk(server.tcp_port, row.path, keepalive, seconds, pinned)
    mode = {"tcp-short": "short", "tcp-persistent": "persistent", "udp": "udp"}[row.group]
    port = server.udp_port if mode == "udp" else server.tcp_port
    return lambda seconds: run_echo_load(mode, port, seconds, pinned, settings.load_processes)


def run_pass(settings: argparse.Namespace, base: Path, pinned: bool) -> list[Result]:
    """Every selected row *rounds* times, in alternating order (A..Z, Z..A, ...); rounds pooled."""
    selected = [row for row in rows() if not settings.only or any(word in f"{row.group} {row.name}"
                                                                   for word in settings.only)]
    by_row: dict[Row, list[Result]] = {row: [] for row in selected}
    for turn in range(settings.rounds):
        order = selected if turn % 2 == 0 else selected[::-1]
        for index, row in enumerate(order):
            _progress(f"{'pinned' if pinned else 'unpinned'} round {turn + 1}/{settings.rounds}, "
                      f"{index + 1}/{len(order)}: {row.group}: {row.name}")
            directory = Path(tempfile.mkdtemp(prefix=f"{turn}-{index}-", dir=base))
            result = measure(row, directory, settings, pinned)
            _progress(f"  {result.rps:,.0f} req/s, p99 {result.load.p99 * 1000:.2f} ms, {result.load.errors} errors, "
                      f"{result.cpu_us:.1f} µs CPU/req, load generator {result.load_busy:.0%}")
            by_row[row].append(result)
    return [pooled(results) for results in by_row.values()]


def pooled(results: list[Result]) -> Result:
    """The rounds of one row as one: counts, wall and CPU summed; latencies the median round's."""
    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    load = LoadResult(sum(r.load.requests for r in results), sum(r.load.errors for r in results),
                      sum(r.load.wall for r in results), median([r.load.p50 for r in results]),
                      median([r.load.p99 for r in results]), sum(r.load.load_cpu for r in results))
    return Result(results[0].row, results[0].pinned, load, sum(r.server_cpu for r in results))


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


def machine_lines(argv: list[str]) -> list[str]:
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout.split(" [")[0]
    versions = {name: _version(name) for name in ("gunicorn", "psutil")}
    return ["| | |", "|---|---|",
            f"| CPU | {cpu_model()} ({os.cpu_count()} logical CPUs) |",
            f"| OS | {platform.system()} {platform.release()} |",
            f"| Python | {platform.python_implementation()} {platform.python_version()} |",
            f"| Tools | {wrk.strip() or 'wrk'}; gunicorn {versions['gunicorn']}; psutil {versions['psutil']} |",
            f"| Date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
            f"| Load average before the run | {LOAD_BEFORE[0]:.2f} (1 min; other work on the machine moves "
            f"every figure) |",
            f"| Command | `{' '.join([COMMAND, *argv])}` |"]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# How to read some rows; true of the mechanisms, whatever the figures of a given run.
READING = [
    ("- **CPU per request is the comparison; req/s only where the load generator is not at its limit.** "
     "With the server pinned to one CPU, every multi-process server shares that CPU, so req/s is "
     "about 1 / (CPU per request); a load generator near 100% of its CPU is what limits that row."),
    ("- **Raw TCP, short connections: the kernel dominates.** Per connection a prefork sync worker "
     "makes accept4, getsockname (the socket constructor's check), 2 recvfrom, sendto, shutdown and "
     "close, as the naive pre-fork does; the naive one adds a poll() per connection, which prefork "
     "replaces by taking queued connections in a batch (`strace -c` of one worker over 3,000 "
     "sequential connections: 94 epoll_wait against 3,000 poll). On loopback the send runs the "
     "peer's receive path too, so those calls are most of the CPU (py-spy of a worker: 52% of "
     "samples in the send, 26% in recv, under 15% in Python code of either server): the runtime's "
     "own share, where prefork can be leaner, is a few µs of the ~55."),
    ("- **Errors in the HTTP rows without keep-alive** for `http.server`: it closes the connection "
     "after the response, as the client asked, but does not say `Connection: close` in the "
     "response; wrk then counts the close as a read error. The responses were complete (wrk counts "
     "them as requests too). `workers.http` and `workers.wsgi` say it."),
    ("- **Synchronous servers and keep-alive:** a sync worker holds a kept-alive connection until "
     "the client closes it, so with 8 wrk connections and 2 sync workers only 2 connections are "
     "served; the others wait and their requests are not in the latency figures (wrk counts only "
     "answered requests). Thread mode serves all of them. gunicorn's sync worker closes after every "
     "response (it does no keep-alive)."),
    ("- **stdlib ThreadingHTTPServer with keep-alive, ~40 ms per request:** `http.server` sends the "
     "headers and the body in two writes without TCP_NODELAY, and Nagle's algorithm waits for the "
     "client's delayed ACK. `workers.http` sets TCP_NODELAY; `workers.wsgi` sends both in one write."),
    ("- **Fork modes** (prefork `--mode fork`, ForkingTCPServer) fork a process per connection: "
     "milliseconds of CPU each, which persistent connections amortise."),
]


def render(passes: dict[str, list[Result]], argv: list[str], settings: argparse.Namespace) -> str:
    lines = ["# Benchmarks: prefork against the stdlib and gunicorn", "",
             "Generated by `loadtests/bench.py` (its docstring explains the method); do not edit by hand, "
             "run it again.", "", *machine_lines(argv), "",
             "## How to reproduce", "", "```sh",
             "apt-get install -y wrk && .venv/bin/pip install -e '.[load]' gunicorn matplotlib",
             COMMAND, "```", "",
             "## Method", "",
             f"Every row: a fresh server, {settings.warmup:g} s of warm-up, then {settings.seconds:g} s measured "
             f"under the same load; {settings.rounds} rounds per pass, the rows in alternating order (A..Z, "
             f"Z..A), pooled: req/s and CPU per request over all rounds' requests, p50 and p99 the median "
             f"of the rounds'. Multi-process servers run {WORKERS} workers; thread modes {THREADS} threads "
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


# -- the command line ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=(__doc__ or "").split("\n", 1)[0])
    add = parser.add_argument
    add("--seconds", type=float, default=2.0, help="measured seconds per row and round")
    add("--rounds", type=positive, default=2, help="times each row runs per pass (alternating order), pooled")
    add("--warmup", type=float, default=1.0, help="warm-up seconds per row")
    add("--load-processes", type=positive, default=1, help="processes of the raw TCP/UDP load generator")
    add("--passes", choices=("both", "pinned", "unpinned"), default="both")
    add("--only", nargs="*", default=[], help="rows whose group or name contains one of these words")
    add("--output", default=str(DEFAULT_OUTPUT), help="report file ('-': none); the PNG goes beside it")
    return parser.parse_args(argv)


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_args(argv)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is required (apt-get install -y {'wrk' if tool == 'wrk' else 'util-linux'})")
    signal.signal(signal.SIGTERM, _exit_on_term)
    can_pin = {LOAD_CPU, SERVER_CPU} <= os.sched_getaffinity(0)
    wanted = [p for p in (True, False) if settings.passes in ("both", "pinned" if p else "unpinned")]
    started, LOAD_BEFORE[0] = time.monotonic(), os.getloadavg()[0]
    passes: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for pinned in wanted:
            if pinned and not can_pin:
                _progress("fewer than 2 usable CPUs: the pinned pass is skipped")
                continue
            title = (f"pinned: load on CPU {LOAD_CPU}, server on CPU {SERVER_CPU}" if pinned else "unpinned")
            passes[title] = run_pass(settings, Path(tmp), pinned)
    report = render(passes, argv, settings)
    print(report)
    if settings.output != "-":
        Path(settings.output).write_text(report, encoding="utf-8")
        chart(passes, Path(settings.output).with_suffix(".png"))
        _progress(f"wrote {settings.output} and {Path(settings.output).with_suffix('.png')}")
    _progress(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
