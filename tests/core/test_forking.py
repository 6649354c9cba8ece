"""ForkingMixIn: children leave through os._exit, max_children, reaping, block_on_close.

Forks happen in the main thread (handle_request) wherever the test allows it, so no fork is
made from a multi-threaded process unless the test needs serve_forever() in a thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest

import prefork.socketserver as socketserver
from tests.core.util import (
    LOCALHOST,
    connect,
    exists,
    is_zombie,
    live_children,
    read_line,
    readable,
    reap,
)
from tests.support import SOCKET_TIMEOUT, recv_all, serving, wait_until

# Exit status of a child that returned from handle_request() into the test's own code.
RETURNED_INTO_CALLER = 99

# How long a negative check ("this has not happened") watches before concluding.
QUIET_PERIOD = 0.3


class Behaving(socketserver.BaseRequestHandler):
    """Does what the client's first line says: ok, exception, exit, interrupt or block."""

    def handle(self):
        command = read_line(self.request).strip()
        if command == b"exception":
            raise ValueError("handler failed")
        if command == b"exit":
            raise SystemExit(0)  # even a "successful" SystemExit is a failed request
        if command == b"interrupt":
            raise KeyboardInterrupt
        if command == b"block":
            self.request.sendall(b"started %d\n" % os.getpid())
            self.request.recv(1)  # blocks until the client, in another process, releases it
        self.request.sendall(b"done %d\n" % os.getpid())


class Server(socketserver.ForkingTCPServer):
    def handle_error(self, request, client_address):
        # Runs in the child; tell the client instead of printing a traceback.
        request.sendall(b"handle_error\n")


@pytest.fixture
def statuses(monkeypatch):
    """Exit statuses of the children reaped through os.waitpid, by pid."""
    seen: dict[int, int] = {}
    real_waitpid = os.waitpid

    def waitpid(pid, options):
        done, status = real_waitpid(pid, options)
        if done:
            seen[done] = os.waitstatus_to_exitcode(status)
        return done, status

    monkeypatch.setattr(os, "waitpid", waitpid)
    return seen


@pytest.fixture
def server():
    server = Server(LOCALHOST, Behaving)
    yield server
    server.server_close()


def fork_request(server, command: bytes) -> socket.socket:
    """Send *command* and let the server fork a child for it; returns the client socket."""
    client = connect(server.server_address)
    client.sendall(command + b"\n")
    test_pid = os.getpid()
    server.handle_request()
    if os.getpid() != test_pid:  # a child came back here: make that visible, never run on
        os._exit(RETURNED_INTO_CALLER)
    return client


def hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


def reap_all(server) -> None:
    wait_until(lambda: server.service_actions() or not server.active_children)


@pytest.mark.parametrize(
    ("command", "answer", "status"),
    [
        (b"ok", b"done", 0),
        (b"exception", b"handle_error", 1),
        (b"exit", b"", 1),
        (b"interrupt", b"", 1),
    ],
)
def test_child_leaves_through_os_exit(server, statuses, command, answer, status):
    with fork_request(server, command) as client:
        reply = recv_all(client)
    (pid,) = server.active_children
    reap_all(server)
    assert statuses == {pid: status}
    assert reply.split(b" ")[0].strip() == answer
    with fork_request(server, b"ok") as client:  # the parent goes on serving
        assert recv_all(client).startswith(b"done ")


def test_max_children_is_honoured():
    server = socketserver.ForkingTCPServer(LOCALHOST, Behaving)
    server.max_children = 2
    most = [0]

    def count_children():
        most[0] = max(most[0], len(live_children()))
        return True

    with serving(server, poll_interval=0.05), contextlib.ExitStack() as stack:
        # Ending the connections first (also on failure) ends every child before serving()
        # waits for them. shutdown(), not just close(): the children hold copies of these
        # client sockets too, forked while the test held them.
        clients = [stack.enter_context(connect(server.server_address)) for _ in range(4)]
        for client in clients:
            stack.callback(hang_up, client)
        for client in clients:
            client.sendall(b"block\n")
        started = [read_line(c) for c in clients[:2]]
        assert all(line.startswith(b"started ") for line in started)
        assert not any(readable(c, QUIET_PERIOD / 2) for c in clients[2:])
        count_children()
        assert len(server.active_children) == 2
        for index, client in enumerate(clients):
            client.sendall(b"!")  # release this one, then the next may start
            assert read_line(client).startswith(b"done ")
            if index + 2 < len(clients):
                wait_until(lambda: count_children() and readable(clients[index + 2], 0.01))
                assert read_line(clients[index + 2]).startswith(b"started ")
    assert most[0] == 2
    assert not server.active_children


def test_active_children_tracked_then_emptied(server):
    assert server.active_children is None
    clients = [fork_request(server, b"block") for _ in range(2)]
    pids = {int(read_line(c).split()[1]) for c in clients}
    assert server.active_children == pids
    for client in clients:
        client.sendall(b"!")
        recv_all(client)
        client.close()
    reap_all(server)
    assert server.active_children == set()
    assert not any(exists(pid) for pid in pids)


@pytest.mark.parametrize("hook", ["handle_timeout", "service_actions"])
def test_reaping_hooks(server, hook):
    with fork_request(server, b"ok") as client:
        recv_all(client)
    (pid,) = server.active_children
    wait_until(lambda: is_zombie(pid))
    getattr(server, hook)()
    assert server.active_children == set()
    assert not exists(pid)


def test_handle_request_timeout_reaps(server):
    with fork_request(server, b"ok") as client:
        recv_all(client)
    (pid,) = server.active_children
    wait_until(lambda: is_zombie(pid))
    server.timeout = 0.01
    server.handle_request()  # nobody connects: handle_timeout runs and reaps
    assert server.active_children == set()


@pytest.mark.parametrize("block_on_close", [True, False])
def test_block_on_close(server, block_on_close):
    server.block_on_close = block_on_close
    client = fork_request(server, b"block")
    pid = int(read_line(client).split()[1])
    closer = threading.Thread(target=server.server_close)
    closer.start()
    try:
        closer.join(QUIET_PERIOD)
        assert closer.is_alive() == block_on_close
        assert not is_zombie(pid)  # the child is still serving its request
    finally:
        client.sendall(b"!")
        recv_all(client)
        client.close()
        closer.join(SOCKET_TIMEOUT)
    assert not closer.is_alive()
    if block_on_close:
        assert not exists(pid)  # server_close waited for it and reaped it
    else:
        assert reap(pid) == 0  # nobody waited for it: ours to reap


def test_reaps_only_its_own_children(server, statuses):
    server.max_children = 1
    client = fork_request(server, b"block")
    read_line(client)
    ours = os.fork()  # a child of the test, not of the server
    if ours == 0:
        os._exit(7)
    wait_until(lambda: is_zombie(ours))
    # At max_children the server waits for one of *its* children; waitpid(-1) would take ours.
    collector = threading.Thread(target=server.service_actions)
    collector.start()
    try:
        collector.join(QUIET_PERIOD)
        assert collector.is_alive()  # still waiting: its own child has not ended
        assert is_zombie(ours)
    finally:
        client.sendall(b"!")
        recv_all(client)
        client.close()
        collector.join(SOCKET_TIMEOUT)
    assert server.active_children == set()
    assert ours not in statuses
    assert reap(ours) == 7


def test_max_children_wait_with_high_descriptor_numbers(server, high_fds):
    server.max_children = 1
    client = fork_request(server, b"block")
    read_line(client)
    client.sendall(b"!")
    with client:
        server.service_actions()  # at max_children: waits for the child, whose pidfd is > 1024
        assert recv_all(client).startswith(b"done ")
    assert server.active_children == set()
