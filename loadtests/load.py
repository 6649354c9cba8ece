"""The load generators of every benchmark. Runs in: bench (and locust, and tests/reliability).

- ``EchoLoad``: one epoll loop keeping N echo requests in flight over short or persistent TCP
  connections or UDP, for a time or a count; ``run_echo_load`` runs it in forked processes.
- ``run_wrk``: HTTP, by wrk.
- ``GatedBatches``: the core's gated load (batches of connections queued behind a gate).
- ``Conversation``, ``Datagrams``: blocking stream and datagram clients (also locust's echo users);
  ``request``, ``holding``: one blocking request, or connections held open (the master's steering).
- ``bad_clients``, ``good_client_latencies``, ``held_by``: idle and stalled connections and a
  well-behaved client beside them.

A reply is complete at its newline and right when it ends with the line sent: the echo servers
send the line back, the master's ``pid`` handler prefixes it with the worker's pid.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import itertools
import math
import multiprocessing
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import psutil

from loadtests.harness import START_TIMEOUT, percentile, process_cpu_seconds, stop_process_group

__all__ = ["EchoLoad", "LoadResult", "run_echo_load", "run_wrk", "GatedBatches", "Served", "Conversation",
           "Datagrams", "request", "holding", "bad_clients", "held_by", "good_client_latencies", "p99", "LINE", "HALF_LINE"]

LINE = b"ping from loadtests\n"
# What a stalled client sends: a line without its newline.
HALF_LINE = b"half a line that never en"
# A persistent connection is closed and reopened after this many requests: a synchronous server
# serves one connection at a time, and connections that never close would starve the others.
REQUESTS_PER_CONNECTION = 100
# A request without an answer after this long is an error (a lost datagram, a stuck connection).
REQUEST_TIMEOUT = 2.0
# Every blocking client socket gets this timeout: no read or connect can hang the run.
SOCKET_TIMEOUT = 10.0
# Timeout of every bad client's socket: longer than a run, so only the server closes them.
BAD_CLIENT_TIMEOUT = 60.0
# No load phase makes more requests than this, whatever the duration.
MAX_REQUESTS = 2_000_000
# No counted load phase, and no socket operation of the gated load, may take longer than this.
LOAD_PHASE_TIMEOUT = 60.0


# -- the epoll echo load ---------------------------------------------------------------------------


class _Slot:
    """One request in flight: its socket, start time, what it waits for."""

    __slots__ = ("sock", "started", "buffer", "used", "expected", "connected")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.started, self.buffer, self.used, self.expected, self.connected = 0.0, b"", 0, LINE, False


class EchoLoad:
    """An epoll loop keeping *concurrency* echo requests in flight (mode short, persistent or udp)."""

    def __init__(self, mode: str, address: tuple[str, int], concurrency: int) -> None:
        self.mode, self.address, self.concurrency = mode, address, concurrency
        self.epoll = select.epoll()
        self.slots: dict[int, _Slot] = {}
        self.latencies = array.array("d")
        self.errors = self.sequence = 0

    def run(self, seconds: float, max_requests: int = MAX_REQUESTS) -> EchoLoad:
        deadline = time.monotonic() + seconds
        for _ in range(self.concurrency):
            self._open(_Slot())
        next_check = time.monotonic() + REQUEST_TIMEOUT / 4
        while len(self.latencies) < max_requests and time.monotonic() < deadline:
            for fd, events in self.epoll.poll(0.1):
                if (slot := self.slots.get(fd)) is not None:
                    self._event(fd, slot)
            if time.monotonic() >= next_check:
                self._expire(time.perf_counter())
                next_check = time.monotonic() + REQUEST_TIMEOUT / 4
        for slot in list(self.slots.values()):
            self._close(slot)
        self.epoll.close()
        return self

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
        slot.connected = slot.connected or code == 0
        self.epoll.register(slot.sock.fileno(), select.EPOLLIN if slot.connected else select.EPOLLOUT)
        if slot.connected:
            self._send(slot, fresh=False)

    def _send(self, slot: _Slot, fresh: bool = True) -> None:
        assert slot.sock is not None
        if fresh:
            slot.started = time.perf_counter()
        if self.mode == "udp":
            self.sequence += 1
            slot.expected = b"%d " % self.sequence + LINE
        slot.sock.send(slot.expected)  # far below an empty socket buffer: never partial

    def _event(self, fd: int, slot: _Slot) -> None:
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
        if slot.buffer.endswith(b"\n"):
            self._done(slot) if slot.buffer.endswith(LINE) else self._fail(slot)

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
            if now - slot.started <= REQUEST_TIMEOUT:
                continue
            if self.mode == "udp":
                self.errors += 1  # the datagram or its reply was lost: send a new one
                self._send(slot)
            else:
                self._fail(slot)


@dataclasses.dataclass
class LoadResult:
    requests: int
    errors: int
    wall: float
    p50: float  # seconds
    p99: float
    load_cpu: float  # seconds of CPU the load generator used


def _load_process(mode: str, address: tuple[str, int], concurrency: int, seconds: float, cpu: int | None,
                  out: Connection) -> None:
    """Called in the child: pin, run the load, send back latencies, errors, wall and CPU time."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    start_wall, start_cpu = time.monotonic(), time.process_time()
    load = EchoLoad(mode, address, concurrency).run(seconds)
    out.send((load.latencies.tobytes(), load.errors, time.monotonic() - start_wall, time.process_time() - start_cpu))
    out.close()


def run_echo_load(mode: str, address: tuple[str, int], seconds: float, concurrency: int, processes: int = 1,
                  cpu: int | None = None) -> LoadResult:
    """*processes* load processes (fork), *concurrency* shared out between them; results merged."""
    context = multiprocessing.get_context("fork")
    children = []
    for index in range(processes):
        share = max(1, concurrency // processes + (1 if index < concurrency % processes else 0))
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_load_process, args=(mode, address, share, seconds, cpu, send), daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    latencies, errors, walls, load_cpu = array.array("d"), 0, [], 0.0
    for child, receive in children:
        if not receive.poll(seconds + START_TIMEOUT):
            child.kill()
            raise RuntimeError(f"a load process did not report within {seconds + START_TIMEOUT:.0f} s")
        data, child_errors, wall, child_cpu = receive.recv()
        child.join(START_TIMEOUT)
        latencies.frombytes(data)
        errors, load_cpu = errors + child_errors, load_cpu + child_cpu
        walls.append(wall)
    return LoadResult(len(latencies), errors, max(walls), percentile(latencies, 0.5), percentile(latencies, 0.99),
                      load_cpu)


# -- wrk -------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
# HTTP connections kept by wrk (one thread).
HTTP_CONNECTIONS = 8


def run_wrk(url: str, keepalive: bool, seconds: float, cpu: int | None) -> LoadResult:
    """wrk for *seconds* (whole seconds: wrk takes no fraction); its CPU from getrusage."""
    argv = ["wrk", "-t", "1", "-c", str(HTTP_CONNECTIONS), "-d", f"{max(1, round(seconds))}s",
            "--timeout", f"{REQUEST_TIMEOUT:g}s", "--latency", url]
    if not keepalive:
        argv[1:1] = ["-H", "Connection: close"]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    before = _children_cpu()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=seconds + START_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_process_group(proc.pid)
        raise RuntimeError(f"wrk did not finish: {' '.join(argv)}") from None
    return parse_wrk(out.decode(errors="replace"), _children_cpu() - before)


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def _duration(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def parse_wrk(text: str, load_cpu: float) -> LoadResult:
    def found(pattern: str) -> tuple[str, ...]:
        match = re.search(pattern, text, re.M)
        if not match:
            raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{text}")
        return match.groups()

    requests, wall, unit = found(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    errors += sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    p50, p99 = (_duration(*found(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$")) for p in ("50", "99"))
    return LoadResult(int(requests), errors, _duration(wall, unit), p50, p99, load_cpu)


# -- the core's gated load -------------------------------------------------------------------------


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


def _connect_quietly(address: tuple[str, int]) -> socket.socket:
    """A connection that has sent nothing yet (on loopback, established when connect() returns)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(LOAD_PHASE_TIMEOUT)
    sock.connect(address)
    return sock


def _expect_echo(sock: socket.socket) -> None:
    """Read until the server closes; AssertionError unless the echo is LINE."""
    received = b"".join(iter(lambda: sock.recv(4096), b""))
    if received != LINE:
        raise AssertionError(f"bad echo: {received!r}")


class GatedBatches:
    """Queues batches of connections behind a gate, then releases each batch at once.

    The server drains every batch back to back, so its CPU per request is the cost of its loop
    and nothing else, whatever the client's speed. Only the drains count as the server's working
    time (for req/s and busy).
    """

    def __init__(self, address: tuple[str, int], batch: int) -> None:
        self._address, self._batch = address, batch

    def run(self, count: int, server_pid: int) -> Served:
        """Serve at least *count* requests (whole batches, the gates included)."""
        served = Served()
        while served.requests < count:
            served.add(self._one_batch(server_pid))
        return served

    def _one_batch(self, server_pid: int) -> Served:
        with contextlib.ExitStack() as stack:
            gate, *batch = (stack.enter_context(_connect_quietly(self._address)) for _ in range(self._batch + 1))
            for sock in batch:
                sock.sendall(LINE)  # queued behind the gate, which the server is blocked on
            wall, cpu = time.perf_counter(), process_cpu_seconds(server_pid)
            gate.sendall(LINE)  # the gate opens
            _expect_echo(batch[-1])  # served in order: the last one ends the drain
            drained = Served(self._batch + 1, time.perf_counter() - wall, process_cpu_seconds(server_pid) - cpu)
            for sock in (gate, *batch[:-1]):
                _expect_echo(sock)
        return drained


class FreeLoad:
    """The core's free-running load: ``EchoLoad`` short connections, *count* requests per turn."""

    def __init__(self, address: tuple[str, int], concurrency: int) -> None:
        self._address, self._concurrency = address, concurrency

    def run(self, count: int, server_pid: int) -> Served:
        wall, cpu = time.perf_counter(), process_cpu_seconds(server_pid)
        load = EchoLoad("short", self._address, self._concurrency).run(LOAD_PHASE_TIMEOUT, count)
        return Served(len(load.latencies), time.perf_counter() - wall, process_cpu_seconds(server_pid) - cpu)


# -- blocking clients ------------------------------------------------------------------------------


class Conversation:
    """One client connection; ``ask`` sends a line and returns the reply's first word as an int."""

    def __init__(self, address: Any, family: int = socket.AF_INET, timeout: float = SOCKET_TIMEOUT) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
            if family != socket.AF_UNIX:  # one write per request: never wait for a delayed ACK
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.sock.close()
            raise
        self._buffer = b""

    def reply(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed by the server after {self._buffer!r}")
            self._buffer += chunk
        reply, _, self._buffer = self._buffer.partition(b"\n")
        return reply + b"\n"

    def ask(self, line: bytes) -> int:
        return int(self.reply(line + b"\n").split(b" ", 1)[0])

    def close(self) -> None:
        self.sock.close()


class Datagrams:
    """One client datagram socket; ``reply`` sends a numbered datagram and waits for the same back.

    The number makes each request unique, so a late reply to an earlier request that timed out is
    skipped instead of being taken for this one's. A Unix datagram needs a bound sender to be
    answered: the socket binds a path of its own, removed by ``close``.
    """

    def __init__(self, address: Any, family: int = socket.AF_INET, timeout: float = SOCKET_TIMEOUT) -> None:
        self.address, self.timeout, self._sequence = address, timeout, itertools.count()
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self._path = os.path.join(tempfile.mkdtemp(prefix="lc-", dir="/tmp"), "c") if family == socket.AF_UNIX else None
        if self._path:
            self.sock.bind(self._path)

    def reply(self, payload: bytes) -> bytes:
        expected = b"%d " % next(self._sequence) + payload
        self.sock.sendto(expected, self.address)
        deadline = time.monotonic() + self.timeout
        while (reply := self.sock.recv(65536)) != expected:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no matching reply within {self.timeout} s")
        return reply

    def close(self) -> None:
        self.sock.close()
        if self._path:
            shutil.rmtree(os.path.dirname(self._path), ignore_errors=True)


def request(address: tuple[str, int], line: bytes = b"ping") -> int:
    """One short connection: one line, one reply; returns the pid of the worker that served it."""
    conversation = Conversation(address)
    try:
        return conversation.ask(line)
    finally:
        conversation.close()


@contextlib.contextmanager
def holding(address: tuple[str, int], line: bytes, count: int) -> Iterator[list[bytes]]:
    """Open *count* connections one after the other, each kept open after its answer to *line*.

    A held connection keeps its worker busy, so each next one goes to another worker. Yields
    the replies (a ``pid`` server's start with the pid of the worker), in order.
    """
    conversations: list[Conversation] = []
    try:
        replies = []
        for _ in range(count):
            conversations.append(Conversation(address))
            replies.append(conversations[-1].reply(line))
        yield replies
    finally:
        for conversation in conversations:
            conversation.close()


# -- idle and slow clients -------------------------------------------------------------------------


@contextlib.contextmanager
def bad_clients(address: Any, idle: int, stalled: int, family: int = socket.AF_INET) -> Iterator[list[socket.socket]]:
    """*idle* connections that send nothing and *stalled* ones that send HALF_LINE, open for the block."""
    opened: list[socket.socket] = []
    try:
        for index in range(idle + stalled):
            sock = socket.socket(family, socket.SOCK_STREAM)
            opened.append(sock)
            sock.settimeout(BAD_CLIENT_TIMEOUT)
            sock.connect(address)
            if index >= idle:
                sock.sendall(HALF_LINE)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def held_by(pids: list[int], address: Any) -> int:
    """How many connections to *address* (TCP (host, port), or a Unix path) *pids* hold, listeners aside."""
    return sum(_held_by(pid, address) for pid in pids)


def _held_by(pid: int, address: Any) -> int:
    try:
        if isinstance(address, str):  # accepted Unix sockets show the listener's path; one is the listener
            return max(0, sum(1 for c in psutil.Process(pid).net_connections("unix") if c.laddr == address) - 1)
        return sum(1 for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr[1] == address[1])
    except psutil.Error:
        return 0  # gone meanwhile


def good_client_latencies(address: Any, requests: int, timeout: float, family: int = socket.AF_INET,
                          budget: float = math.inf) -> list[float]:
    """Seconds each of *requests* sequential one-line requests took (a failure counts as *timeout*).

    After *budget* seconds the requests not yet made count as *timeout* too: a starved service
    ends the run in bounded time.
    """
    latencies: list[float] = []
    give_up = time.monotonic() + budget
    for _ in range(requests):
        started = time.monotonic()
        if started > give_up:
            return latencies + [timeout] * (requests - len(latencies))
        try:
            conversation = Conversation(address, family, timeout)
            with contextlib.closing(conversation):
                if conversation.reply(LINE) != LINE:
                    raise ConnectionError("wrong echo")
            latencies.append(time.monotonic() - started)
        except OSError:
            latencies.append(timeout)
    return latencies


def p99(latencies: list[float]) -> float:
    return percentile(latencies, 0.99)
