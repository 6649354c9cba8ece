"""The accept side: blocking accepted sockets, silent lost races, resource errors backed off."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

import pytest

import prefork.servers
import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST, connect
from tests.support import SOCKET_TIMEOUT, recv_all, serving, stream_request, wait_until

# Resource failures in a row for the back-off tests, and the window they are counted in.
WINDOW = 0.3
# Far fewer get_request() calls than a busy loop would make in WINDOW (tens of thousands).
MAX_CALLS_IN_WINDOW = 20


class SocketState(socketserver.BaseRequestHandler):
    """Answers with the accepted socket's timeout and blocking mode, seen from inside."""

    def handle(self):
        timeout = self.request.gettimeout()
        blocking = os.get_blocking(self.request.fileno())
        self.request.sendall(b"%r %r" % (timeout, blocking))


@pytest.mark.parametrize("listener_timeout", [None, 5.0])
@pytest.mark.parametrize("family", ["TCP", "UnixStream"])
def test_accepted_sockets_are_blocking(family, listener_timeout, sock_dir):
    if family == "TCP":
        server, af = socketserver.ThreadingTCPServer(LOCALHOST, SocketState), socket.AF_INET
    else:
        server = socketserver.ThreadingUnixStreamServer(str(sock_dir / "a.sock"), SocketState)
        af = socket.AF_UNIX
    server.socket.settimeout(listener_timeout)
    with serving(server):
        answer = stream_request(server.server_address, b"", family=af)
        assert server.socket.gettimeout() == listener_timeout  # unchanged by serving
    assert answer == b"None True"


@pytest.mark.parametrize("family", ["TCP", "UnixStream"])
def test_get_request_never_waits_out_a_timeout_the_application_gave_the_listener(family, sock_dir):
    """Nothing queued: EAGAIN at once, not the listener's timeout spent in poll() (a worker's loop
    would stand still that long after every batch of accepts)."""
    if family == "TCP":
        server = socketserver.TCPServer(LOCALHOST, SocketState)
    else:
        server = socketserver.UnixStreamServer(str(sock_dir / "t.sock"), SocketState)
    with server:
        server.socket.settimeout(30.0)
        server.prepare_listener()
        with pytest.raises(BlockingIOError):
            server.get_request()
        assert server.socket.gettimeout() == 30.0


def test_listener_is_non_blocking_under_an_unchanged_timeout():
    with socketserver.TCPServer(LOCALHOST, SocketState) as server:
        with serving(server):
            assert stream_request(server.server_address, b"") == b"None True"
            # Non-blocking at the descriptor so a shared listener never blocks a worker in
            # accept(); the Python-level timeout the application set stays what it was.
            assert os.get_blocking(server.socket.fileno()) is False
            assert server.socket.gettimeout() is None


class RaceClient:
    """A client of a stream or datagram server, and what the rival worker does to it."""

    def __init__(self, server_cls):
        self.datagram = server_cls is socketserver.UDPServer
        kind = socket.SOCK_DGRAM if self.datagram else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.settimeout(SOCKET_TIMEOUT)

    def send(self, address) -> None:
        if self.datagram:
            self.sock.sendto(b"x", address)
        else:
            self.sock.connect(address)

    @staticmethod
    def steal(rival: socket.socket, datagram: bool) -> None:
        if datagram:
            rival.recvfrom(64)
        else:
            rival.accept()[0].close()


@pytest.mark.parametrize("server_cls", [socketserver.TCPServer, socketserver.UDPServer])
def test_lost_race_is_silent_and_does_not_block(server_cls, capfd, caplog):
    """Another process takes the request between the wake-up and accept() / recvfrom()."""
    server = server_cls(LOCALHOST, SocketState)
    rival = server.socket.dup()  # stands for the same listener in another worker
    client = RaceClient(server_cls)
    real_get_request = server.get_request
    stolen = []

    def get_request():
        if not stolen:
            RaceClient.steal(rival, client.datagram)  # the rival wins the race
            stolen.append(True)
        return real_get_request()

    server.get_request = get_request
    with server, rival, client.sock:
        client.send(server.server_address)
        handler = threading.Thread(target=server.handle_request)
        handler.start()
        handler.join(SOCKET_TIMEOUT / 2)
        blocked = handler.is_alive()
        if blocked:  # unblock it so that the test can end, then fail
            unblock = RaceClient(server_cls)
            with unblock.sock:
                unblock.send(server.server_address)
                handler.join(SOCKET_TIMEOUT)
    assert stolen and not blocked, "handle_request() blocked after losing the race"
    assert capfd.readouterr() == ("", "")
    assert [r for r in caplog.records if r.name.startswith("prefork")] == []


class Flaky:
    """get_request() that fails with *error* while `failing` is set, counting every call."""

    def __init__(self, server, error: int):
        self.calls = 0
        self.failing = True
        self._real = server.get_request
        self._error = error

    def __call__(self):
        self.calls += 1
        if self.failing:
            raise OSError(self._error, os.strerror(self._error))
        return self._real()


@pytest.fixture
def fresh_rate_limit(monkeypatch):
    """A rate limiter of our own: the process-wide one may have logged in an earlier test."""
    limiter = prefork.servers._RateLimitedReporter(prefork.servers._RESOURCE_LOG_INTERVAL)
    monkeypatch.setattr(prefork.servers, "_resource_limiter", limiter)


def resource_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "prefork.server" and r.levelno == logging.ERROR]


@pytest.mark.parametrize(
    "error", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM], ids=errno.errorcode.get
)
def test_serve_forever_backs_off_on_resource_errors(error, caplog, fresh_rate_limit):
    caplog.set_level(logging.ERROR, logger="prefork.server")
    server = socketserver.TCPServer(LOCALHOST, SocketState)
    flaky = server.get_request = Flaky(server, error)
    with serving(server):
        with connect(server.server_address) as client:  # keeps the listener readable
            wait_until(lambda: flaky.calls >= MAX_CALLS_IN_WINDOW, timeout=WINDOW, fail=False)
            assert 2 <= flaky.calls < MAX_CALLS_IN_WINDOW  # retried, but no busy loop
            flaky.failing = False
            assert recv_all(client) == b"None True"  # and served once the error stops
    (record,) = resource_errors(caplog)  # once per interval, however many failures
    assert os.strerror(error) in record.getMessage()
    assert str(server.server_address) in record.getMessage()


def test_handle_request_backs_off_on_emfile(caplog, fresh_rate_limit):
    caplog.set_level(logging.ERROR, logger="prefork.server")
    server = socketserver.TCPServer(LOCALHOST, SocketState)
    flaky = server.get_request = Flaky(server, errno.EMFILE)
    with server, connect(server.server_address) as client:
        deadline = time.monotonic() + WINDOW
        while time.monotonic() < deadline:
            server.handle_request()  # each call returns after a failed accept, like the stdlib
        assert 2 <= flaky.calls < MAX_CALLS_IN_WINDOW
        flaky.failing = False
        server.handle_request()
        assert recv_all(client) == b"None True"
    assert len(resource_errors(caplog)) == 1


def test_other_accept_errors_are_silent(capfd, caplog):
    server = socketserver.TCPServer(LOCALHOST, SocketState)
    flaky = server.get_request = Flaky(server, errno.ECONNABORTED)
    with server, connect(server.server_address) as client:
        server.handle_request()
        flaky.failing = False
        server.handle_request()
        assert recv_all(client) == b"None True"
    assert flaky.calls == 2
    assert capfd.readouterr() == ("", "")
    assert [r for r in caplog.records if r.name.startswith("prefork")] == []


def test_back_off_with_high_descriptor_numbers(caplog, fresh_rate_limit, high_fds):
    # serve_forever() makes its wake-up channel now, above FD_SETSIZE; backing off waits on it.
    caplog.set_level(logging.ERROR, logger="prefork.server")
    server = socketserver.TCPServer(LOCALHOST, SocketState)
    flaky = server.get_request = Flaky(server, errno.EMFILE)
    with serving(server):
        with connect(server.server_address) as client:
            wait_until(lambda: flaky.calls >= 2)
            flaky.failing = False
            assert recv_all(client) == b"None True"
    assert len(resource_errors(caplog)) == 1


class Counting(socketserver.TCPServer):
    """Counts service_actions() calls and the requests served, in the order they come."""

    def __init__(self, *args):
        self.events: list[str] = []
        super().__init__(*args)

    def finish_request(self, request, client_address):
        self.events.append("request")
        super().finish_request(request, client_address)

    def service_actions(self):
        self.events.append("service_actions")


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


def test_queued_requests_are_taken_in_one_wake_up(monkeypatch):
    """Connections already queued are served without a wait per request, and service_actions()
    still follows every request, as after every turn of the stdlib's loop."""
    queued = 5
    waits = []
    raw_wait = prefork.servers.Poller.raw_wait

    def counted_raw_wait(poller):
        wait = raw_wait(poller)
        return lambda timeout: waits.append(timeout) or wait(timeout)

    monkeypatch.setattr(prefork.servers.Poller, "raw_wait", counted_raw_wait)
    with Counting(LOCALHOST, Echo) as server:
        clients = [connect(server.server_address) for _ in range(queued)]
        for client in clients:
            client.sendall(b"hi\n")
        with serving(server, poll_interval=SOCKET_TIMEOUT):
            replies = [recv_all(client) for client in clients]
            wait_until(lambda: server.events.count("service_actions") >= queued)
        for client in clients:
            client.close()
    assert replies == [b"hi\n"] * queued
    events = server.events[: 2 * queued]
    assert events == ["request", "service_actions"] * queued
    # All five were taken in the first wake-up; the stdlib's loop waits once per request.
    assert len(waits) < queued, waits
