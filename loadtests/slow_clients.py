"""Idle and slow clients against a stream service, and a well-behaved client's latency meanwhile. Runs in: bench.

(Also imported by tests/reliability/test_slow_clients.py: one harness for the benchmark row and
the bounded test.)

The bad clients are the two of issue 11: connections that connect and send nothing, and
connections that send half a line and stall. Both stay open until the block ends. The
well-behaved client opens a connection per request, sends one line and reads the echo; its
latency is from connect() to the last byte of the reply. A request that fails or times out
counts as ``timeout`` seconds, so a starved service shows as a p99 at the timeout, not as a
shorter list.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil

from loadtests.bench_core import percentile

__all__ = ["HALF_LINE", "LINE", "bad_clients", "held_by", "good_client_latencies", "p99"]

# What a stalled client sends: a line without its newline.
HALF_LINE = b"half a line that never en"
LINE = b"a well-behaved client\n"
# Timeout of every bad client's socket: longer than a run, so only the server closes them.
BAD_CLIENT_TIMEOUT = 60.0


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
            _echo_once(address, timeout, family)
            latencies.append(time.monotonic() - started)
        except OSError:
            latencies.append(timeout)
    return latencies


def _echo_once(address: Any, timeout: float, family: int) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(LINE)
        with sock.makefile("rb") as replies:
            reply = replies.readline()
        if reply != LINE:
            raise ConnectionError(f"wrong echo {reply!r}")


def p99(latencies: list[float]) -> float:
    return percentile(latencies, 0.99)
