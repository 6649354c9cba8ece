"""shutdown() wakes serve_forever() at once; serving can restart; the context manager closes."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST, waiting_for_requests
from tests.support import SOCKET_TIMEOUT, stream_request, wait_until

# A generous bound, not a benchmark: the stdlib would take up to the full poll interval (10 s).
FAST_SHUTDOWN = 1.0
SLOW_POLL = 10.0


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


def start(server, poll_interval: float = SLOW_POLL) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,))
    thread.start()
    return thread


def timed_shutdown(server, thread: threading.Thread) -> float:
    """How long shutdown() takes once the loop is asleep in its wait."""
    try:
        wait_until(lambda: waiting_for_requests(thread))
    finally:
        # Stop the loop even when the wait failed: a live non-daemon thread would keep the
        # whole pytest process from exiting.
        began = time.monotonic()
        server.shutdown()
        elapsed = time.monotonic() - began
        thread.join(SOCKET_TIMEOUT)
    assert not thread.is_alive()
    return elapsed


@pytest.mark.parametrize("server_cls", [socketserver.TCPServer, socketserver.UDPServer])
def test_shutdown_is_fast_with_a_long_poll_interval(server_cls):
    with server_cls(LOCALHOST, Echo) as server:
        thread = start(server)
        if server_cls is socketserver.TCPServer:
            assert stream_request(server.server_address, b"up\n") == b"up\n"  # the loop runs
        assert timed_shutdown(server, thread) < FAST_SHUTDOWN


def test_shutdown_while_the_loop_starts_is_not_lost():
    with socketserver.TCPServer(LOCALHOST, Echo) as server:
        thread = start(server)
        server.shutdown()  # may come before serve_forever() has made its wake-up channel
        thread.join(SOCKET_TIMEOUT)
        assert not thread.is_alive()


def test_serve_forever_restarts_after_shutdown():
    with socketserver.TCPServer(LOCALHOST, Echo) as server:
        for turn in range(3):
            thread = start(server)
            payload = b"turn %d\n" % turn
            assert stream_request(server.server_address, payload) == payload
            assert timed_shutdown(server, thread) < FAST_SHUTDOWN


def test_context_manager_closes_the_socket():
    with socketserver.TCPServer(LOCALHOST, Echo) as server:
        assert server.socket.fileno() >= 0
    assert server.socket.fileno() == -1


def test_context_manager_closes_on_error_and_lets_it_through():
    with pytest.raises(ZeroDivisionError):
        with socketserver.UDPServer(LOCALHOST, Echo) as server:
            1 / 0
    assert server.socket.fileno() == -1


def test_context_manager_of_a_unix_server(sock_dir):
    with socketserver.UnixStreamServer(str(sock_dir / "cm.sock"), Echo) as server:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.connect(server.server_address)
            client.sendall(b"u\n")
            server.handle_request()
            assert client.recv(16) == b"u\n"
    assert server.socket.fileno() == -1


def test_server_close_is_idempotent():
    server = socketserver.TCPServer(LOCALHOST, Echo)
    server.server_close()
    server.server_close()  # as in the stdlib: closing twice is harmless
    assert server.socket.fileno() == -1
