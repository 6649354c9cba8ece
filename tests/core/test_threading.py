"""ThreadingMixIn: daemon_threads, block_on_close, and forgetting finished threads."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST, connect
from tests.support import SOCKET_TIMEOUT, serving, stream_request, wait_until

# How long a negative check ("server_close has not returned") watches before concluding.
QUIET_PERIOD = 0.3


class Recording(socketserver.BaseRequestHandler):
    """Records its thread, then waits for the server's `release` event if there is one."""

    def handle(self):
        thread = threading.current_thread()
        self.server.seen.append((thread.name, thread.daemon, weakref.ref(thread)))
        self.request.sendall(b"started")
        release = self.server.release
        if release is not None:
            assert release.wait(SOCKET_TIMEOUT)
        self.server.finished.append(thread.name)


class Server(socketserver.ThreadingTCPServer):
    release: threading.Event | None = None

    def __init__(self, *args, **kwargs):
        self.seen: list = []
        self.finished: list[str] = []
        super().__init__(*args, **kwargs)


@pytest.mark.parametrize("daemon", [False, True])
def test_daemon_threads_honoured(daemon):
    server = Server(LOCALHOST, Recording)
    server.daemon_threads = daemon
    with serving(server):
        assert stream_request(server.server_address, b"") == b"started"
    ((name, is_daemon, _),) = server.seen
    assert is_daemon is daemon
    assert name.endswith("(process_request_thread)")  # the stdlib's default thread name


def close_while_blocked(server) -> tuple[threading.Thread, bool]:
    """Start server_close() in a thread while a request is blocked; did it return meanwhile?"""
    closer = threading.Thread(target=server.server_close)
    closer.start()
    closer.join(QUIET_PERIOD)
    return closer, not closer.is_alive()


@pytest.mark.parametrize(
    ("block_on_close", "daemon", "waits"),
    [(True, False, True), (False, False, False), (True, True, False)],
    ids=["block_on_close", "no_block_on_close", "daemon_threads_never_waited_for"],
)
def test_server_close_waits_for_request_threads(block_on_close, daemon, waits):
    server = Server(LOCALHOST, Recording)
    server.block_on_close = block_on_close
    server.daemon_threads = daemon
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(SOCKET_TIMEOUT,))
    thread.start()
    try:
        with connect(server.server_address) as client:
            assert client.recv(7) == b"started"
    finally:
        server.shutdown()
        thread.join(SOCKET_TIMEOUT)
    try:
        closer, returned_early = close_while_blocked(server)
        assert returned_early is not waits
        assert server.finished == []  # the request was still running meanwhile
    finally:
        server.release.set()
    closer.join(SOCKET_TIMEOUT)
    if waits:
        assert len(server.finished) == 1  # it finished before server_close() returned
    wait_until(lambda: server.finished)  # in every case it ends (the leak check needs that)


def test_finished_threads_are_forgotten():
    requests = 20
    server = Server(LOCALHOST, Recording)
    with serving(server):
        for _ in range(requests):
            assert stream_request(server.server_address, b"") == b"started"
            wait_until(lambda: len(server.finished) == len(server.seen))
        # Once ended, a request thread is referenced by nobody: the server keeps no list of
        # finished threads (the stdlib keeps at most the last one until the next request).
        wait_until(lambda: gc.collect() is not None and alive(server.seen) <= 1)
    assert len(server.seen) == requests


def alive(seen) -> int:
    return sum(1 for _, _, ref in seen if ref() is not None)
