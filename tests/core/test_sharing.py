"""One listener shared by several forked processes, each running serve_forever().

This is how prefork's workers use the core: the test forks the workers itself (from its
single-threaded main thread) and each child leaves only through os._exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST, read_line
from tests.support import SOCKET_TIMEOUT, wait_until

WORKERS = 3
CONNECTIONS = 30
BATCH = 10  # connections opened at once, so that several workers wake for the same burst
SINGLES = 10  # then connections one by one: without EPOLLEXCLUSIVE each wakes every worker
TOTAL = CONNECTIONS + SINGLES


class Tagged(socketserver.StreamRequestHandler):
    """Answers "<id> <pid>" and logs the same line to the shared served-log."""

    def handle(self):
        line = b"%s %d\n" % (self.rfile.readline().strip(), os.getpid())
        os.write(self.server.served_log, line)  # O_APPEND: one whole line per write
        self.wfile.write(line)


class SharedServer(socketserver.TCPServer):
    # A burst of BATCH connections must fit in the backlog, or the kernel drops SYNs and
    # the clients retry a second later.
    request_queue_size = 64


def worker(server, stop_pipe: tuple[int, int], stderr_path: Path) -> NoReturn:
    """Called in the child: serve until told to stop, then leave through os._exit."""
    status = 1
    stop_fd, parents_end = stop_pipe
    try:
        os.close(parents_end)  # or this child would keep its own stop pipe open forever
        _redirect_stderr(stderr_path)
        watcher = threading.Thread(target=_stop_when_told, args=(server, stop_fd))
        watcher.start()
        server.serve_forever(poll_interval=SOCKET_TIMEOUT)  # wake-ups only by work or shutdown
        watcher.join()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _redirect_stderr(path: Path) -> None:
    """Everything this child would say (tracebacks, prefork's log) goes to *path*."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    logger = logging.getLogger("prefork")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.DEBUG)


def _stop_when_told(server, stop_fd: int) -> None:
    os.read(stop_fd, 1)  # returns b"" once the test closes the write end
    server.shutdown()


def ask(address, ident: int) -> bytes:
    sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT)
    sock.sendall(b"%d\n" % ident)
    return sock


def start_workers(server, stop_pipe: tuple[int, int], tmp_path: Path) -> list[int]:
    pids = []
    for index in range(WORKERS):
        pid = os.fork()
        if pid == 0:
            worker(server, stop_pipe, tmp_path / ("stderr-%d" % index))
        pids.append(pid)
    return pids


def exited(pids: list[int], statuses: dict[int, int]) -> bool:
    for pid in pids:
        if pid not in statuses:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses[pid] = os.waitstatus_to_exitcode(status)
    return len(statuses) == len(pids)


def kill_leftovers(pids: list[int], statuses: dict[int, int]) -> None:
    for pid in pids:
        if pid not in statuses:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def run_clients(address) -> list[bytes]:
    """Bursts of BATCH connections, then one at a time, which finds every worker idle."""
    replies = []
    for first in range(0, CONNECTIONS, BATCH):
        socks = [ask(address, ident) for ident in range(first, first + BATCH)]
        for sock in socks:
            with sock:
                replies.append(read_line(sock))
    for ident in range(CONNECTIONS, CONNECTIONS + SINGLES):
        with ask(address, ident) as sock:
            replies.append(read_line(sock))
    return replies


def test_shared_listener_serves_each_connection_once(tmp_path):
    server = SharedServer(LOCALHOST, Tagged)
    server.served_log = os.open(tmp_path / "served", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    stop_r, stop_w = os.pipe()
    pids = start_workers(server, (stop_r, stop_w), tmp_path)
    address = server.server_address
    server.server_close()  # the parent does not serve; its copy of the listener goes
    os.close(server.served_log)
    os.close(stop_r)
    statuses: dict[int, int] = {}
    try:
        replies = run_clients(address)
        os.close(stop_w)  # every worker's watcher reads EOF and calls shutdown()
        stop_w = -1
        wait_until(lambda: exited(pids, statuses), message="a worker did not stop (blocked in accept?)")
    finally:
        if stop_w != -1:
            os.close(stop_w)
        kill_leftovers(pids, statuses)
    assert statuses == {pid: 0 for pid in pids}
    served = [line.split() for line in (tmp_path / "served").read_bytes().splitlines()]
    assert sorted(int(ident) for ident, _ in served) == list(range(TOTAL))  # exactly once
    assert {int(pid) for _, pid in served} <= set(pids)
    for ident, reply in enumerate(replies):
        number, pid = reply.split()
        assert int(number) == ident and int(pid) in pids
    for index in range(WORKERS):
        assert (tmp_path / ("stderr-%d" % index)).read_text() == ""  # lost races are silent
