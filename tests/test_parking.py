"""prefork.parking without processes: a lot, socket pairs as connections, a fake server and clock."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Iterator

import pytest

from prefork import parking
from prefork.parking import FirstMessage, ParkingLot
from tests.support import SOCKET_TIMEOUT

LINE = FirstMessage(delimiters=(b"\n",), timeout=5.0)


class FakeServer:
    """Hands out the server ends of socket pairs; records what it is asked to serve."""

    def __init__(self) -> None:
        self.waiting: list[socket.socket] = []
        self.served: list[socket.socket] = []
        self.opened: list[socket.socket] = []

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.settimeout(SOCKET_TIMEOUT)
        self.waiting.append(ours)
        self.opened += [ours, theirs]
        return theirs

    def close(self) -> None:
        for sock in self.opened:
            sock.close()

    def take_request(self) -> tuple[Any, Any] | None:
        return (self.waiting.pop(0), "peer") if self.waiting else None

    def dispatch_request(self, request: Any, client_address: Any) -> None:
        self.served.append(request)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def lot(clock: Clock) -> Iterator[ParkingLot]:
    parked = ParkingLot(limit=4, clock=clock)
    yield parked
    parked.close()


def never() -> bool:
    return False


def settle(lot: ParkingLot) -> None:
    lot.collect(SOCKET_TIMEOUT)
    lot.serve(never)


def test_a_client_that_has_sent_its_first_message_is_served_at_once(server: FakeServer, lot: ParkingLot) -> None:
    client = server.connect()
    client.sendall(b"hello\n")
    assert lot.take(server, LINE, never) == 1
    assert len(server.served) == 1 and len(lot) == 0


def test_a_half_line_waits_until_its_delimiter_arrives(server: FakeServer, lot: ParkingLot) -> None:
    client = server.connect()
    client.sendall(b"hal")
    lot.take(server, LINE, never)
    lot.collect(0)
    assert server.served == [] and len(lot) == 1
    client.sendall(b"f\n")
    settle(lot)
    assert len(server.served) == 1 and len(lot) == 0
    assert server.served[0].recv(100) == b"half\n", "a peek must leave every byte to the handler"


@pytest.mark.parametrize("sent, ready", [(b"GET / HTTP/1.1\r\nHost: x\r\n", False),
                                         (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
                                         (b"GET / HTTP/1.0\n\n", True)])
def test_any_of_several_delimiters_completes_the_first_message(server: FakeServer, lot: ParkingLot,
                                                               sent: bytes, ready: bool) -> None:
    server.connect().sendall(sent)
    lot.take(server, FirstMessage(delimiters=(b"\n\r\n", b"\n\n")), never)
    assert len(server.served) == ready


def test_without_a_delimiter_the_first_byte_is_enough(server: FakeServer, lot: ParkingLot) -> None:
    client = server.connect()
    lot.take(server, FirstMessage(), never)
    assert len(lot) == 1
    client.sendall(b"x")
    settle(lot)
    assert len(server.served) == 1


def test_a_client_that_stops_sending_is_served_with_what_it_sent(server: FakeServer, lot: ParkingLot) -> None:
    client = server.connect()
    client.sendall(b"no newline")
    lot.take(server, LINE, never)
    client.shutdown(socket.SHUT_WR)
    settle(lot)
    assert len(server.served) == 1  # the handler reads the last line, then EOF


def test_as_many_bytes_as_a_first_message_may_have_are_served_without_a_delimiter(server: FakeServer,
                                                                                  lot: ParkingLot) -> None:
    server.connect().sendall(b"x" * 100)
    lot.take(server, FirstMessage(delimiters=(b"\n",), max_bytes=100), never)
    assert len(server.served) == 1


def test_a_reset_while_waiting_is_forgotten_silently(server: FakeServer, lot: ParkingLot,
                                                     caplog: Any) -> None:
    client = server.connect()
    lot.take(server, LINE, never)
    client.close()  # the peer end of a socket pair: EOF, which the handler would see
    settle(lot)
    assert len(server.served) == 1 and len(lot) == 0
    assert not caplog.records


def test_waiting_past_the_timeout_closes_with_one_log_line_per_interval(server: FakeServer, lot: ParkingLot,
                                                                         clock: Clock,
                                                                         caplog: Any) -> None:
    clients = [server.connect() for _ in range(3)]
    lot.take(server, LINE, never)
    clock.now += LINE.timeout  # type: ignore[operator]
    with caplog.at_level(logging.INFO, "prefork.parking"):
        lot.expire()
    assert len(lot) == 0 and server.served == []
    assert all(client.recv(1) == b"" for client in clients)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "closed 1 connection(s) that sent no complete first message within 5s"]
    more = [server.connect() for _ in range(2)]
    lot.take(server, LINE, never)
    clock.now += parking.REPORT_INTERVAL
    with caplog.at_level(logging.INFO, "prefork.parking"):
        lot.expire()
    # The two left out of the first line, and the first of these two; the other waits its turn.
    assert "closed 3 connection(s)" in caplog.records[-1].getMessage()
    assert all(client.recv(1) == b"" for client in more)


def test_a_full_lot_closes_its_oldest_connection(server: FakeServer, lot: ParkingLot, caplog: Any) -> None:
    clients = [server.connect() for _ in range(lot.limit + 1)]
    with caplog.at_level(logging.WARNING, "prefork.parking"):
        lot.take(server, LINE, never)
    assert len(lot) == lot.limit
    assert clients[0].recv(1) == b"", "the oldest should have been closed"
    clients[-1].sendall(b"newest\n")
    settle(lot)
    assert len(server.served) == 1
    assert len(caplog.records) == 1 and "at most 4 wait per worker" in caplog.records[0].getMessage()


def test_a_client_dribbling_its_first_message_is_closed(server: FakeServer, lot: ParkingLot,
                                                        monkeypatch: Any, caplog: Any) -> None:
    monkeypatch.setattr(parking, "PEEK_BUDGET", 10)
    client = server.connect()
    lot.take(server, LINE, never)
    with caplog.at_level(logging.INFO, "prefork.parking"):
        for _ in range(20):
            client.sendall(b"x")
            lot.collect(SOCKET_TIMEOUT)
            if not len(lot):
                break
    assert len(lot) == 0 and server.served == []
    with pytest.raises(ConnectionResetError):  # closed with its bytes unread
        client.recv(1)
    assert "dribbling" in caplog.records[0].getMessage()


def test_a_signal_ends_a_batch_of_accepts(server: FakeServer, lot: ParkingLot) -> None:
    for _ in range(3):
        server.connect()
    assert lot.take(server, LINE, lambda: True) == 1
    assert len(server.waiting) == 2


def test_a_forked_child_closes_its_copies_of_the_waiting_connections(server: FakeServer, lot: ParkingLot) -> None:
    client = server.connect()
    lot.take(server, LINE, never)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if len(lot) == 0 else 1)  # at-fork hook ran; never return into pytest
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert len(lot) == 1  # the parent's stay
    client.sendall(b"still here\n")
    settle(lot)
    assert len(server.served) == 1


class Handler:
    timeout = 300.0
    message_delimiter = b"\n"


class Greeter:
    server_speaks_first = True


@pytest.mark.parametrize("handler, server_first, read_timeout, expected", [
    (Handler, False, 0.0, FirstMessage((b"\n",), 300.0)),
    (Handler, False, 2.0, FirstMessage((b"\n",), 2.0)),  # the stricter of the two
    (object, False, 0.0, FirstMessage((), None)),
    (Handler, True, 0.0, None),
    (Greeter, False, 0.0, None),
])
def test_the_rule_comes_from_the_handler_the_listener_and_read_timeout(handler: Any, server_first: bool,
                                                                        read_timeout: float, expected: Any) -> None:
    assert FirstMessage.of(handler, server_first, read_timeout) == expected
