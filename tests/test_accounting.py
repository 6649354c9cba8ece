"""What a synchronous worker's server reports per request: the latency histogram, the access log."""

from __future__ import annotations

import gc
import io
import re
import socket

import pytest

from prefork import accounting
from prefork.log import AccessLog
from prefork.scoreboard import Scoreboard
from prefork.socketserver import BaseRequestHandler, TCPServer


class _Sleepless(BaseRequestHandler):
    def handle(self) -> None:
        pass


@pytest.mark.parametrize("access_log", [False, True], ids=["no-access-log", "access-log"])
def test_each_request_is_counted_once_in_the_histogram(access_log: bool) -> None:
    """With the access log on or off, a request is one count, timed once, on its listener's histogram."""
    board = Scoreboard.create(1)
    lines = io.BytesIO()
    access = AccessLog(lines) if access_log else None
    try:
        board.claim(0, 1, 1)
        _serve_two_connections(board, access)
        assert [h.count for h in board.slot_latency(0)[:2]] == [0, 2]
        if access is not None:
            access.flush()
            logged = lines.getvalue().decode().splitlines()
            assert len(logged) == 2 and all(re.search(r"tcp://test", line) for line in logged), logged
    finally:
        gc.collect()  # the server and its wrapped hooks hold each other: a cycle, and the writer in it
        board.close()


def _serve_two_connections(board: Scoreboard, access: AccessLog | None) -> None:
    """Two connections through an instrumented server's own hooks, counted on listener 1.

    Its own function: the server's wrapped hooks hold the slot's writer, whose views into the
    map must be gone before the scoreboard closes.
    """
    with TCPServer(("127.0.0.1", 0), _Sleepless) as server:
        accounting.instrument(server, board.writer(0), "tcp://test", 1, access)
        for _ in range(2):
            with socket.create_connection(server.server_address, timeout=10):
                request, address = server.get_request()
                server.process_request(request, address)
