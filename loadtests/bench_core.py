"""Benchmarks of the core: prefork.socketserver against the stdlib's socketserver. Runs in: bench.

("bench" is this script's own process, which is also the load generator, plus the echo
server processes it spawns; nothing here runs in a prefork master or worker.)

Run from the repository root, on a Linux machine with at least two CPUs:

    .venv/bin/python -m loadtests.bench_core

Options (see ``--help``): ``--trials``, ``--rounds``, ``--warmup``, ``--requests``, ``--load``
(``gated``, the default, or ``free``), ``--batch``, ``--concurrency``, ``--seed``, ``--output``
(``-`` writes no file). A full run takes about a minute. It prints the report and writes it to
``docs/benchmarks-core.md``.

Rules of this script:

1. Both implementations get the same work in the same run: the same handler code, the same
   random shutdown points, the same client. Their turns alternate (stdlib, prefork, prefork,
   stdlib, ...) so that a drift of the machine does not favour one side: for the CPU
   benchmark both servers run side by side and take turns every batch (tens of milliseconds),
   because runs of a few seconds one after the other differed by up to 20% on a shared
   virtual machine, whatever the implementation.
2. Loopback only, ports bound to 0 and read back, every wait has a deadline, and every
   process started here is stopped here (by its own handle, never by name).
3. Server CPU is read from outside the server (the kernel's per-process CPU clock), so no
   instrumentation runs on the measured path.

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

Linux only: it pins with ``sched_setaffinity``, reads CPU clocks of other processes and waits
with epoll.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import faulthandler
import importlib
import multiprocessing
import os
import platform
import random
import select
import socket
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import psutil
from loadtests.common import positive

# The comparison: the stdlib's module is imported only by name, in this script.
STDLIB = "socketserver"
PREFORK = "prefork.socketserver"
IMPLEMENTATIONS = (STDLIB, PREFORK)

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks-core.md"
COMMAND = ".venv/bin/python -m loadtests.bench_core"

# The load generator and the server each get a CPU of their own, so neither steals the
# other's time and the server's CPU clock counts only the server.
CLIENT_CPU = 0
SERVER_CPU = 1

# The line every request sends and expects back. Short on purpose: the benchmark is about
# the per-connection cost of the loop, not about moving bytes.
REQUEST_LINE = b"ping from bench_core\n"
# A handler reads at most this much: the client never sends more than one short line.
MAX_LINE = 1024

# Let serve_forever() enter its loop before the random shutdown point starts counting, so
# every trial measures a running loop, not a thread that has not started yet.
SETTLE_DELAY = 0.02
# The stdlib's default poll interval: shutdown points are spread uniformly over one period.
DEFAULT_POLL_INTERVAL = 0.5
# The goal for prefork's median shutdown latency (the stdlib's is half a poll interval).
SHUTDOWN_GOAL = 0.005
# A shutdown() that has not returned by then is a hang: dump the stacks and exit.
SHUTDOWN_HANG_TIMEOUT = 30.0

# A server process reports its port within this time or the run fails.
SERVER_START_TIMEOUT = 20.0
# A server process stops by itself after this long even if nobody tells it to.
SERVER_LIFETIME = 300.0
# How long the stdlib's shutdown() may take (one poll interval) plus slack, before we kill.
SERVER_STOP_TIMEOUT = 5.0
# No measured phase may take longer than this; a stall is an error, not a result.
LOAD_PHASE_TIMEOUT = 60.0

# Gated mode: connections queued behind each gate. Large enough that the gate's own cost and
# the drain's first wake-up are lost in the batch, small enough for the default somaxconn.
DEFAULT_BATCH = 500
# Free mode: requests given to one server before the other one's turn.
FREE_CHUNK = 1_000
# Free mode: connections in flight. The server keeps the default backlog (request_queue_size
# = 5) there; staying under it means no SYN is ever dropped, which would add a one-second
# retransmission and measure the kernel's timer instead of the server.
DEFAULT_CONCURRENCY = 4


# -- the handler, written once, and the servers ----------------------------------------------------


def _echo_one_line(self: Any) -> None:
    """The body of both handlers: read one line, write it back."""
    self.wfile.write(self.rfile.readline(MAX_LINE))


def make_echo_handler(base: type) -> type:
    """Build the echo handler on *base*, the StreamRequestHandler of one implementation.

    The handler's timeout stays at its default (None) on purpose: setting one makes every
    read a poll() plus a recv() and would measure a path that the default handler never
    takes. The server process is bounded by its lifetime instead.
    """
    name = f"EchoHandler_{base.__module__.replace('.', '_')}"
    return type(name, (base,), {"handle": _echo_one_line})


def load_implementation(name: str) -> Any:
    return importlib.import_module(name)


def make_echo_server(module: Any, backlog: int | None = None) -> Any:
    """A plain synchronous TCPServer of *module* on a loopback port chosen by the kernel.

    *backlog*, when given, replaces ``request_queue_size`` (the same way for both sides): the
    gated load queues a whole batch behind the gate.
    """
    server_class = module.TCPServer
    if backlog is not None:
        server_class = type("EchoTCPServer", (server_class,), {"request_queue_size": backlog})
    return server_class((LOOPBACK, 0), make_echo_handler(module.StreamRequestHandler))


# -- small statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The *fraction* quantile of *values* by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def _alternating(items: Sequence[Any], turn: int) -> list[Any]:
    """*items* in order on even turns, reversed on odd ones (A B, B A, A B, ...)."""
    return list(items) if turn % 2 == 0 else list(reversed(items))


# -- benchmark 1: shutdown latency -----------------------------------------------------------------


@dataclasses.dataclass
class LatencySummary:
    implementation: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 0.9)

    @property
    def worst(self) -> float:
        return max(self.samples)


def measure_shutdown(module: Any, delay: float) -> float:
    """Seconds from calling shutdown() until it returns, *delay* seconds into serve_forever()."""
    server = make_echo_server(module)
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
            raise RuntimeError(f"{module.__name__}: serve_forever() still running after shutdown()")


def bench_shutdown(trials: int, rng: random.Random) -> dict[str, LatencySummary]:
    """Alternate the two implementations, each pair sharing one random shutdown point."""
    modules = [load_implementation(name) for name in IMPLEMENTATIONS]
    samples: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for trial in range(trials):
        delay = rng.uniform(0.0, DEFAULT_POLL_INTERVAL)
        for module in _alternating(modules, trial):
            samples[module.__name__].append(measure_shutdown(module, delay))
    return {name: LatencySummary(name, values) for name, values in samples.items()}


# -- benchmark 2: CPU per request, the server process ---------------------------------------------


def serve_echo(
    implementation: str, cpu: int | None, backlog: int | None, control: Connection
) -> None:
    """Called in the child: pin to *cpu*, serve the echo handler until told to stop.

    The port goes back over *control*; any message on it, its end-of-file (the parent died)
    or SERVER_LIFETIME stops the server through its own shutdown().
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    server = make_echo_server(load_implementation(implementation), backlog)
    control.send(server.server_address[1])
    stopper = threading.Thread(target=_stop_when_told, args=(server, control), daemon=True)
    stopper.start()
    with server:
        server.serve_forever()


def _stop_when_told(server: Any, control: Connection) -> None:
    control.poll(SERVER_LIFETIME)
    server.shutdown()


@dataclasses.dataclass
class ServerProcess:
    """The parent's handle on one spawned echo server."""

    process: Any
    control: Connection
    port: int = 0

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        """Ask for a clean stop, then escalate to TERM and KILL on this one process."""
        try:
            self.control.send("stop")
        except OSError:
            pass  # the child is already gone; joining below is all that is left
        self.process.join(SERVER_STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(SERVER_STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.control.close()


def start_server(implementation: str, cpu: int | None, backlog: int | None) -> ServerProcess:
    """Spawn a fresh interpreter serving *implementation*'s echo server; return once it listens."""
    # spawn, not fork: each server starts from a clean interpreter, identical for both sides.
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=serve_echo, args=(implementation, cpu, backlog, child_end),
        name=f"echo[{implementation}]", daemon=True,
    )
    process.start()
    child_end.close()
    server = ServerProcess(process, parent_end)
    try:
        if not parent_end.poll(SERVER_START_TIMEOUT):
            raise RuntimeError(f"the {implementation} echo server did not start")
        server.port = parent_end.recv()
    except BaseException:
        server.stop()  # an EOFError above means it died while starting; see its stderr
        raise
    return server


def process_cpu_seconds(pid: int) -> float:
    """User plus system time of process *pid* so far, from its kernel CPU clock (ns resolution).

    /proc/PID/stat counts in clock ticks (10 ms), a visible error over a run of a second or
    two; the process's CPU clock is exact. Linux names the clock of another process
    ``~pid << 3 | CPUCLOCK_SCHED`` (2).
    """
    return time.clock_gettime((~pid << 3) | 2)


# -- benchmark 2: the load generator ---------------------------------------------------------------


class _Connection:
    """One short client connection: connect, send the line, read the echo until EOF.

    Non-blocking; every wait on it goes through _wait_for with a deadline.
    """

    __slots__ = ("sock", "received", "sent")

    def __init__(self, address: tuple[str, int], send: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.received = bytearray()
        code = self.sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            self.sock.close()
            raise ConnectionError(code, os.strerror(code))
        self.sent = send and self.try_send()

    def try_send(self) -> bool:
        """Send the line; False if the connection is not established yet.

        On loopback the handshake is done before connect() returns, so the line goes out at
        once and is already waiting when the server accepts it.
        """
        try:
            # Far smaller than an empty socket buffer: one send() takes all of it.
            self.sock.send(REQUEST_LINE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            return False
        return True

    def send_by(self, deadline: float) -> None:
        while not self.try_send():
            _wait_for(self.sock, select.POLLOUT, deadline)
        self.sent = True

    def read_to_eof(self) -> bool:
        """Read what has arrived; True once the server has closed (the request is complete)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return False
            if not data:
                return True
            self.received += data

    def finish_by(self, deadline: float) -> None:
        """Wait for the whole echo and the server's close, check the echo, close."""
        while not self.read_to_eof():
            _wait_for(self.sock, select.POLLIN, deadline)
        self.sock.close()
        if self.received != REQUEST_LINE:
            raise AssertionError(f"bad echo: {bytes(self.received)!r}")


def _wait_for(sock: socket.socket, event: int, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"no answer within {LOAD_PHASE_TIMEOUT}s")
    poller = select.poll()  # not select(): descriptors may pass FD_SETSIZE with large batches
    poller.register(sock, event)
    poller.poll(remaining * 1000)


@dataclasses.dataclass
class Served:
    """What one load phase did: requests completed, the server's working time and CPU in it."""

    requests: int = 0
    wall: float = 0.0
    server_cpu: float = 0.0

    def add(self, other: Served) -> None:
        self.requests += other.requests
        self.wall += other.wall
        self.server_cpu += other.server_cpu


class Load(Protocol):
    """A way of driving one echo server: GatedBatches or FreeLoad."""

    def run(self, count: int, server_pid: int) -> Served: ...

    def close(self) -> None: ...


class GatedBatches:
    """Queues batches of connections behind a gate, then releases each batch at once.

    See the module docstring: the server drains every batch back to back, so its CPU per
    request is the cost of its loop and nothing else, whatever the client's speed. Only the
    drains count as the server's working time (for req/s and busy).
    """

    def __init__(self, address: tuple[str, int], batch: int) -> None:
        self._address = address
        self._batch = batch

    def run(self, count: int, server_pid: int) -> Served:
        """Serve at least *count* requests (whole batches, the gates included)."""
        served = Served()
        deadline = time.monotonic() + LOAD_PHASE_TIMEOUT
        while served.requests < count:
            served.add(self._one_batch(server_pid, deadline))
        return served

    def _one_batch(self, server_pid: int, deadline: float) -> Served:
        connections = [_Connection(self._address, send=False)]
        try:
            connections += [_Connection(self._address) for _ in range(self._batch)]
            for conn in connections[1:]:
                conn.send_by(deadline)
            wall, cpu = time.perf_counter(), process_cpu_seconds(server_pid)
            connections[0].send_by(deadline)  # the gate opens
            connections[-1].finish_by(deadline)  # served in order: the last one ends the drain
            drained = Served(
                len(connections), time.perf_counter() - wall, process_cpu_seconds(server_pid) - cpu
            )
            for conn in connections[:-1]:
                conn.finish_by(deadline)
        finally:
            for conn in connections:
                conn.sock.close()
        return drained

    def close(self) -> None:
        """Nothing stays open between batches."""


class FreeLoad:
    """Keeps *concurrency* short connections in flight, one thread on a bare epoll.

    The selectors module and threads with blocking sockets both cost the client more per
    connection; even so this client needs about as much CPU per request as the server.
    """

    def __init__(self, address: tuple[str, int], concurrency: int) -> None:
        self._address = address
        self._concurrency = concurrency
        self._epoll = select.epoll()
        self._connections: dict[int, _Connection] = {}

    def close(self) -> None:
        for conn in self._connections.values():
            conn.sock.close()
        self._connections.clear()
        self._epoll.close()

    def run(self, count: int, server_pid: int) -> Served:
        """Complete exactly *count* requests, then return with nothing in flight."""
        wall, cpu = time.perf_counter(), process_cpu_seconds(server_pid)
        started = completed = 0
        deadline = time.monotonic() + LOAD_PHASE_TIMEOUT
        while completed < count:
            while started < count and len(self._connections) < self._concurrency:
                self._open()
                started += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{completed}/{count} requests after {LOAD_PHASE_TIMEOUT}s")
            for fd, _ in self._epoll.poll(1.0):
                completed += self._advance(fd)
        return Served(count, time.perf_counter() - wall, process_cpu_seconds(server_pid) - cpu)

    def _open(self) -> None:
        conn = _Connection(self._address)
        fd = conn.sock.fileno()
        self._connections[fd] = conn
        self._epoll.register(fd, select.EPOLLIN if conn.sent else select.EPOLLOUT)

    def _advance(self, fd: int) -> int:
        """Move connection *fd* on after an event; 1 when its request is complete, else 0."""
        conn = self._connections[fd]
        if not conn.sent:
            if not conn.try_send():
                raise ConnectionError("writable but not connected")
            conn.sent = True
            self._epoll.modify(fd, select.EPOLLIN)
            return 0
        if not conn.read_to_eof():
            return 0
        del self._connections[fd]
        conn.finish_by(time.monotonic())  # complete already: checks the echo and closes
        return 1


# -- benchmark 2: measuring one round --------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """The command line, resolved."""

    trials: int
    rounds: int
    warmup: int
    requests: int
    load: str
    batch: int
    concurrency: int
    seed: int
    argv: list[str]

    @property
    def backlog(self) -> int | None:
        """The servers' listen backlog: the default, except where a whole batch must queue."""
        return self.batch + 1 if self.load == "gated" else None

    @property
    def chunk(self) -> int:
        """Requests given to one server before the other one's turn."""
        return self.batch if self.load == "gated" else FREE_CHUNK

    def make_load(self, port: int) -> Load:
        if self.load == "gated":
            return GatedBatches((LOOPBACK, port), self.batch)
        return FreeLoad((LOOPBACK, port), self.concurrency)


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

    @property
    def requests_per_second(self) -> float:
        return self.served.requests / self.served.wall

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu / self.served.requests * 1e6

    @property
    def user_us_per_request(self) -> float:
        return self.server_user / self.served.requests * 1e6

    @property
    def system_us_per_request(self) -> float:
        return self.server_system / self.served.requests * 1e6

    @property
    def server_busy(self) -> float:
        """Share of its CPU the server used while working: near 1.0 means it set the pace."""
        return self.served.server_cpu / self.served.wall

    @property
    def client_us_per_request(self) -> float:
        return self.client_cpu / self.served.requests * 1e6

    def record_server(self, pid: int, sign: float) -> None:
        """Add (sign 1) or subtract (sign -1) the server's CPU times so far."""
        times = psutil.Process(pid).cpu_times()
        self.server_cpu += sign * process_cpu_seconds(pid)
        self.server_user += sign * times.user
        self.server_system += sign * times.system


def measure_round(turn: int, settings: Settings, server_cpu: int | None) -> list[CpuRun]:
    """Both implementations in fresh processes side by side, served in alternating chunks.

    Alternating every chunk (a batch, tens of milliseconds) puts both through the same
    machine weather (see rule 1). While one server works the other waits in its loop,
    which costs it nothing measurable.
    """
    runs = [CpuRun(name, turn) for name in IMPLEMENTATIONS]
    with contextlib.ExitStack() as stack:
        servers = [start_server(name, server_cpu, settings.backlog) for name in IMPLEMENTATIONS]
        for server in servers:
            stack.callback(server.stop)
        loads = [settings.make_load(server.port) for server in servers]
        for load, server in zip(loads, servers):
            stack.callback(load.close)
            load.run(settings.warmup, server.pid)
        for run, server in zip(runs, servers):
            run.record_server(server.pid, -1)
        for chunk in range(-(-settings.requests // settings.chunk)):
            for index in _alternating(range(len(runs)), chunk):
                _serve_chunk(runs[index], loads[index], servers[index].pid, settings.chunk)
        for run, server in zip(runs, servers):
            run.record_server(server.pid, 1)
    return runs


def _serve_chunk(run: CpuRun, load: Load, pid: int, count: int) -> None:
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


def bench_cpu(settings: Settings) -> tuple[list[CpuRun], bool]:
    """*rounds* rounds, each with fresh servers of both implementations."""
    runs: list[CpuRun] = []
    with pinned_to_client_cpu() as pinned:
        for turn in range(settings.rounds):
            _progress(f"cpu/request: round {turn + 1}/{settings.rounds}")
            runs += measure_round(turn, settings, SERVER_CPU if pinned else None)
    return runs, pinned


def median_of(runs: list[CpuRun], implementation: str, metric: Callable[[CpuRun], float]) -> float:
    return statistics.median(metric(run) for run in runs if run.implementation == implementation)


def paired_ratios(runs: list[CpuRun]) -> list[float]:
    """prefork / stdlib CPU per request, round by round (each round runs both)."""
    by_turn: dict[int, dict[str, float]] = {}
    for run in runs:
        by_turn.setdefault(run.turn, {})[run.implementation] = run.cpu_us_per_request
    return [ratio(pair[PREFORK], pair[STDLIB]) for _, pair in sorted(by_turn.items())]


# -- the report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # no /proc: fall through to what platform knows
    return platform.processor() or "unknown"


def machine_lines(settings: Settings, pinned: bool) -> list[str]:
    command = " ".join([COMMAND, *settings.argv])
    pinning = "NOT pinned"
    if pinned:
        pinning = f"server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}"
    return [
        "| | |",
        "|---|---|",
        f"| CPU | {cpu_model()} ({os.cpu_count()} logical CPUs; {pinning}) |",
        f"| OS | {platform.system()} {platform.release()} |",
        f"| Python | {platform.python_implementation()} {platform.python_version()} |",
        f"| Date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
        f"| Command | `{command}` (seed {settings.seed}) |",
    ]


def shutdown_lines(results: dict[str, LatencySummary], trials: int) -> list[str]:
    ours, theirs = results[PREFORK], results[STDLIB]
    verdict = "met" if ours.median <= SHUTDOWN_GOAL else "NOT met"
    return [
        f"`serve_forever()` with the default poll interval ({DEFAULT_POLL_INTERVAL} s) in a "
        f"thread; "
        f"`shutdown()` from the main thread at a random point of one poll period; time until "
        f"`shutdown()` returns. {trials} trials each, alternating, each pair at the same point.",
        "",
        "| implementation | median | p90 | max |",
        "|---|---:|---:|---:|",
        *(_latency_row(summary) for summary in (theirs, ours)),
        "",
        f"**stdlib / prefork (median): {ratio(theirs.median, ours.median):,.0f}×**. "
        f"Goal for prefork, median ≤ {SHUTDOWN_GOAL * 1000:.0f} ms: {verdict}.",
    ]


def _latency_row(s: LatencySummary) -> str:
    return f"| {s.implementation} | {_ms(s.median)} | {_ms(s.p90)} | {_ms(s.worst)} |"


def load_description(settings: Settings) -> str:
    if settings.load == "gated":
        return (
            f"Gated load: a gate connection that sends nothing, {settings.batch} connections "
            f"queued behind it with their line sent, then the gate's line; the server drains the "
            f"batch back to back (backlog {settings.backlog} on both servers). req/s and \"busy\" "
            f"cover the drains; the load generator works while the server waits on the gate."
        )
    return (
        f"Free load: {settings.concurrency} connections in flight from one epoll loop, default "
        f"backlog (5). The load generator runs beside the server."
    )


def turn_description(settings: Settings) -> str:
    if settings.load == "gated":
        return f"batch ({settings.batch} + its gate)"
    return f"{settings.chunk:,} requests"


def cpu_lines(runs: list[CpuRun], settings: Settings) -> list[str]:
    of_medians = ratio(median_of(runs, PREFORK, _cpu_us), median_of(runs, STDLIB, _cpu_us))
    paired = paired_ratios(runs)
    return [
        f"Plain synchronous `TCPServer` and the same one-line echo handler built on each "
        f"`StreamRequestHandler`, each server in its own process pinned to one CPU; the load "
        f"generator on the other CPU. Short connections: connect, send one line, read the echo "
        f"until EOF, close. {load_description(settings)} {settings.rounds} rounds; in each, fresh "
        f"servers of both implementations run side by side and take turns every "
        f"{turn_description(settings)}; {settings.warmup:,} warm-up requests each, then "
        f"{runs[0].served.requests:,} measured each. Server CPU = user + system time of the "
        f"server process over the measured requests (its kernel CPU clock; the user/sys split "
        f"comes from /proc in 10 ms ticks). Figures are medians over the rounds. Absolute "
        f"figures move with the machine's load; the ratio compares both sides under the same "
        f"conditions.",
        "",
        "| implementation | req/s | server CPU µs/req | user µs/req | sys µs/req | server busy "
        "| load generator CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
        _cpu_summary_row(runs, STDLIB),
        _cpu_summary_row(runs, PREFORK),
        "",
        f"**prefork / stdlib CPU per request: {of_medians:.3f}** (ratio of the medians); "
        f"round by round {', '.join(f'{value:.3f}' for value in paired)}. "
        f"Below 1 means prefork spends less.",
        "",
        "Every round:",
        "",
        "| round | implementation | req/s | server CPU µs/req | server busy "
        "| load generator CPU µs/req |",
        "|---:|---|---:|---:|---:|---:|",
        *(_cpu_run_row(run) for run in runs),
    ]


def _cpu_us(run: CpuRun) -> float:
    return run.cpu_us_per_request


def _cpu_summary_row(runs: list[CpuRun], implementation: str) -> str:
    def med(metric: Callable[[CpuRun], float]) -> float:
        return median_of(runs, implementation, metric)

    return (
        f"| {implementation} | {med(lambda r: r.requests_per_second):,.0f} | {med(_cpu_us):.1f} | "
        f"{med(lambda r: r.user_us_per_request):.1f} | "
        f"{med(lambda r: r.system_us_per_request):.1f} | "
        f"{med(lambda r: r.server_busy):.0%} | {med(lambda r: r.client_us_per_request):.1f} |"
    )


def _cpu_run_row(run: CpuRun) -> str:
    return (
        f"| {run.turn + 1} | {run.implementation} | {run.requests_per_second:,.0f} | "
        f"{run.cpu_us_per_request:.1f} | {run.server_busy:.0%} | {run.client_us_per_request:.1f} |"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def render_report(settings: Settings, shutdown: dict[str, LatencySummary], runs: list[CpuRun],
                  pinned: bool) -> str:
    lines = [
        "# Benchmarks of the compatible core",
        "",
        "prefork.socketserver against the standard library's socketserver, side by side in one "
        "run. "
        "Generated by `loadtests/bench_core.py` (its docstring explains the method); do not edit "
        "by hand, run it again.",
        "",
        *machine_lines(settings, pinned),
        "",
        "## 1. Shutdown latency",
        "",
        *shutdown_lines(shutdown, settings.trials),
        "",
        "## 2. CPU per request of the synchronous loop",
        "",
        *cpu_lines(runs, settings),
    ]
    return "\n".join(lines) + "\n"


# -- the command line ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n", 1)[0])
    add = parser.add_argument
    add("--trials", type=positive, default=50, help="shutdown trials per implementation")
    add("--rounds", type=positive, default=3, help="CPU rounds, each with fresh servers of both")
    add("--warmup", type=positive, default=2_000, help="unmeasured requests per server")
    add("--requests", type=positive, default=20_000, help="measured requests per server")
    add("--load", choices=("gated", "free"), default="gated", help="how the client drives")
    add("--batch", type=positive, default=DEFAULT_BATCH, help="gated: connections per gate")
    add("--concurrency", type=positive, default=DEFAULT_CONCURRENCY,
        help="free: connections in flight (keep below the backlog of 5)")
    add("--seed", type=int, default=None, help="seed of the shutdown points")
    add("--output", default=str(DEFAULT_OUTPUT), help="report file, '-' for none")
    return parser.parse_args(argv)


def _progress(message: str) -> None:
    print(f"bench_core: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    settings = Settings(args.trials, args.rounds, args.warmup, args.requests, args.load, args.batch,
                        args.concurrency, seed, argv)
    _progress(f"shutdown latency: {settings.trials} trials per implementation")
    shutdown = bench_shutdown(settings.trials, random.Random(seed))
    runs, pinned = bench_cpu(settings)
    report = render_report(settings, shutdown, runs, pinned)
    print(report)
    if args.output != "-":
        Path(args.output).write_text(report, encoding="utf-8")
        _progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
