"""prefork.aiostages without a master: the PROXY header read on a real socket pair in a real loop
(asyncio's and uvloop's), and the loop's exception handler and the asyncio logger's filter."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Any, Callable, Iterator

import pytest

from prefork.aiostages import Stages, quiet_tls_errors
from prefork.aioworker import new_event_loop
from prefork.parking import Report
from prefork.proxy import ProxyStage
from tests.support import SOCKET_TIMEOUT

LOOPS = ["asyncio", "uvloop"]
HEADER = b"PROXY TCP4 203.0.113.5 127.0.0.1 4000 443\r\n"


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    running = new_event_loop(request.param)
    try:
        yield running
    finally:
        running.close()


class Recorder(asyncio.Protocol):
    """The connection's protocol: what it was made for and what it received."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.data = b""
        self.received = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.received.set()


async def until(predicate: Callable[[], bool], timeout: float = SOCKET_TIMEOUT) -> None:
    """Turn the loop until *predicate()* holds, at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {predicate}"
        await asyncio.sleep(0.001)


def drained(sock: socket.socket) -> bool:
    """True once the worker's side has nothing buffered: what was sent is consumed."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


def proxy_stages() -> Stages:
    return Stages(ProxyStage((1, 2), ()), None, SOCKET_TIMEOUT, Report(time.monotonic))


def test_a_header_in_pieces_is_taken_exactly_and_what_follows_reaches_the_protocol(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> Recorder:
        server, client = socket.socketpair()
        server.setblocking(False)
        made: list[Recorder] = []

        def make(client_address: Any) -> Recorder:
            made.append(Recorder(client_address))
            return made[-1]
        with client:
            client.settimeout(SOCKET_TIMEOUT)
            task = asyncio.ensure_future(proxy_stages().connect(loop, server, "", make))
            for piece in (HEADER[:5], HEADER[5:20]):  # each taken before the next comes: no second peek
                client.sendall(piece)
                await until(lambda: drained(server))
            client.sendall(HEADER[20:] + b"the client's own bytes")
            assert await asyncio.wait_for(task, SOCKET_TIMEOUT)
            await asyncio.wait_for(made[0].received.wait(), SOCKET_TIMEOUT)
            made[0].transport.close()
        return made[0]

    recorder = loop.run_until_complete(scenario())
    assert recorder.client == ("203.0.113.5", 4000)
    assert recorder.data == b"the client's own bytes"


def test_a_truncated_header_is_one_line_and_the_socket_is_closed(loop: asyncio.AbstractEventLoop,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, socket.socket]:
        server, client = socket.socketpair()
        server.setblocking(False)
        with client:
            client.sendall(HEADER[:20])
            client.shutdown(socket.SHUT_WR)
            made = await asyncio.wait_for(proxy_stages().connect(loop, server, "", Recorder), SOCKET_TIMEOUT)
        return made, server

    made, server = loop.run_until_complete(scenario())
    assert not made and server.fileno() == -1
    [line] = [r.getMessage() for r in caplog.records if r.name == "prefork.parking"]
    assert "PROXY header failed: truncated: the peer closed after 20 bytes of a header" in line


def test_ssl_errors_handed_to_the_loop_are_one_line_and_others_keep_their_traceback(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    quiet_tls_errors(loop, Report(time.monotonic))
    quiet_tls_errors(loop, Report(time.monotonic))  # once is enough: a second call changes nothing
    for _ in range(3):
        loop.call_exception_handler({"message": "Fatal error on SSL transport",
                                     "exception": ssl.SSLError(1, "[SSL: BAD_RECORD_MAC] bad record mac")})
    loop.call_exception_handler({"message": "SSL handshake failed", "exception": ConnectionResetError()})  # quiet
    loop.call_exception_handler({"message": "Exception in callback", "exception": RuntimeError("unrelated")})
    quiet = [r for r in caplog.records if r.name == "prefork.parking"]
    assert [r.getMessage().partition(": ")[2] for r in quiet] == [
        "closed 1 connection(s): TLS connection failed: TLS error: [SSL: BAD_RECORD_MAC] bad record mac (the last "
        "from unix)"]
    [other] = [r for r in caplog.records if r.name == "asyncio"]
    assert other.exc_info is not None and isinstance(other.exc_info[1], RuntimeError)


def test_the_loops_debug_records_of_ssl_errors_are_dropped(loop: asyncio.AbstractEventLoop,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("asyncio")
    caplog.set_level(logging.DEBUG, logger="asyncio")
    before = list(logger.filters)
    try:
        quiet_tls_errors(loop, Report(time.monotonic))
        try:
            raise ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")
        except ssl.SSLError:
            logger.debug("%r: %s", "<SSLProtocol>", "SSL handshake failed", exc_info=True)
        logger.debug("an ordinary debug line")
    finally:
        for added in [f for f in logger.filters if f not in before]:
            logger.removeFilter(added)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["an ordinary debug line"]
