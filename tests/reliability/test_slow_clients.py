"""Idle and slow clients against synchronous workers (issue 11 D; README "Idle and slow clients").

Promises checked:

- With ``workers.echo``, 2 sync workers and default settings, 200 connections that send nothing
  and 200 that send half a line and stall do not delay a well-behaved client: its p99 over
  GOOD_REQUESTS requests stays under 100 ms. The stalled clients are still served when they
  finish their line, and the silent ones when they speak (TCP and a Unix socket, where no
  TCP_DEFER_ACCEPT keeps the silent ones in the kernel).
- TERM: connections that completed their first message while the worker was busy, and those
  queued, are answered; idle and stalled ones are closed; the stop does not wait for them.
- A protocol where the server speaks first (``?first=server``, or ``server_speaks_first`` on the
  handler) is greeted at once.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from loadtests.load import HALF_LINE, LINE, bad_clients, good_client_latencies, held_by, p99
from tests.reliability.slow_app import GREETING
from tests.support import SOCKET_TIMEOUT, recv_all, wait_until

pytestmark = pytest.mark.reliability

APP = "tests.reliability.slow_app"
IDLE = STALLED = 200
# Requests of the well-behaved client: its p99 is then about its third-worst request, so a
# hiccup or two of a loaded machine does not decide the test.
GOOD_REQUESTS = 300
P99_BOUND = 0.100
# A request that fails or takes this long counts as this long: a starved client fails the bound.
GOOD_TIMEOUT = 2.0
# The well-behaved client's run ends after this long (a healthy one takes a second or two),
# the requests not made counting as GOOD_TIMEOUT: a starved service fails in bounded time.
GOOD_BUDGET = 30.0
# Deadline for the workers to take every bad connection.
SETTLE_TIMEOUT = 30.0
# Bad clients that finish their line (or speak at last) afterwards, to show they are served.
LATE = 10
# Connections of each kind in the TERM test.
EACH = 5
EXIT_OK = 0


def listener_of(kind: str, sock_dir: Path) -> tuple[str, int]:
    if kind == "tcp":
        return "tcp://127.0.0.1:0", socket.AF_INET
    return f"unix:{sock_dir / 'echo.sock'}", socket.AF_UNIX


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_idle_and_stalled_clients_do_not_delay_a_well_behaved_one(start_master: Any, sock_dir: Path,
                                                                  kind: str) -> None:
    bind, family = listener_of(kind, sock_dir)
    master = start_master(app="workers.echo", bind=[bind], workers=2)
    address = master.address()
    with bad_clients(address, IDLE, STALLED, family) as bad:
        # Once the workers hold them all, the silent ones too (TCP_DEFER_ACCEPT keeps them in the
        # kernel for about a second first): then they wait in the workers' pollers.
        settled = wait_until(lambda: held_by(master.worker_pids(), address) >= IDLE + STALLED, SETTLE_TIMEOUT,
                             fail=False)
        latencies = good_client_latencies(address, GOOD_REQUESTS, GOOD_TIMEOUT, family, GOOD_BUDGET)
        worst = sorted(latencies)[-5:]
        assert p99(latencies) <= P99_BOUND, f"p99 {p99(latencies) * 1000:.1f} ms; worst {worst}"
        assert settled, "the workers never held every bad connection: the run did not test what it says"
        for sock in bad[:LATE]:  # silent until now
            assert last_words(sock, LINE) == LINE
        for sock in bad[-LATE:]:  # stalled mid-line until now
            assert last_words(sock, b"ds\n") == HALF_LINE + b"ds\n"
    assert "Traceback" not in master.log()


def last_words(sock: socket.socket, line: bytes) -> bytes:
    """Send *line* and close the sending side (an echo connection ends there); the reply."""
    sock.sendall(line)
    sock.shutdown(socket.SHUT_WR)
    return recv_all(sock)


def connect(address: Any, first: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT)
    if first:
        sock.sendall(first)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed *sock*: EOF, or a reset (a silent client still in the kernel's
    queue, under TCP_DEFER_ACCEPT, is reset when the last worker closes the listener)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_term_answers_what_completed_its_first_message_and_closes_idle_and_stalled_clients(
        start_master: Any) -> None:
    master = start_master(app=APP, workers=1)
    (worker,) = master.wait_workers(1)
    address = master.address()
    opened: list[socket.socket] = []
    try:
        finishing = [connect(address, b"pi") for _ in range(EACH)]
        stalled = [connect(address, b"pi") for _ in range(EACH)]
        idle = [connect(address, b"") for _ in range(EACH)]
        opened += finishing + stalled + idle
        wait_until(lambda: held_by([worker], address) >= 2 * EACH, message="the worker did not take them")
        holder = connect(address, b"pid\n")  # keeps the only worker in a handler until it closes
        opened.append(holder)
        assert holder.makefile("rb").readline() == b"%d\n" % worker
        for sock in finishing:
            sock.sendall(b"d\n")  # complete while the worker is busy
            sock.shutdown(socket.SHUT_WR)  # one line: its handler ends without waiting for us
        queued = [connect(address, b"pid\n") for _ in range(EACH)]
        opened += queued
        for sock in queued:
            sock.shutdown(socket.SHUT_WR)
        master.signal(signal.SIGTERM)
        wait_until(lambda: "stopping worker" in master.log(), message=master.log())
        holder.close()
        for sock in finishing + queued:
            assert recv_all(sock) == b"%d\n" % worker
        for sock in stalled + idle:
            assert closed_by_server(sock), "an idle or stalled client was answered"
        assert master.wait_exit(timeout=15) == EXIT_OK  # half graceful_timeout: not waited out
    finally:
        for sock in opened:
            sock.close()
    assert "SIGKILL" not in master.log() and "Traceback" not in master.log()


@pytest.mark.parametrize("app, bind", [
    pytest.param(f"{APP}:Greeter", "tcp://127.0.0.1:0?first=server", id="bind-spec"),
    pytest.param(f"{APP}:DeclaredGreeter", "tcp://127.0.0.1:0", id="handler"),
    pytest.param(f"{APP}:Greeter", "unix:{sock_dir}/greeter.sock?first=server", id="unix-bind-spec"),
])
def test_a_server_that_speaks_first_greets_at_once(start_master: Any, sock_dir: Path, app: str, bind: str) -> None:
    bind = bind.format(sock_dir=sock_dir)
    master = start_master(app=app, bind=[bind], workers=1)
    family = socket.AF_UNIX if bind.startswith("unix:") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)  # the greeting waits for nothing; a parked client waits for ever
        sock.connect(master.address())
        replies = sock.makefile("rb")
        assert replies.readline() == GREETING
        sock.sendall(b"hello\n")
        assert replies.readline() == b"hello\n"
