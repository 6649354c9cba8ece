"""The order in which BaseServer calls its hooks, which subclasses written for the stdlib rely on."""

from __future__ import annotations

import socket
import sys

import pytest

import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST, connect
from tests.support import SOCKET_TIMEOUT, recv_all, serving, stream_request, wait_until

HOOKS = (
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "shutdown_request",
    "close_request",
    "handle_timeout",
    "service_actions",
)
REQUEST = ["get_request", "verify_request", "process_request", "finish_request", "handle"]
CLOSE = ["shutdown_request", "close_request"]


class Recorder(socketserver.TCPServer):
    """Records every hook call (and the handler's handle()) in self.calls."""

    verify = True

    def __init__(self, *args, **kwargs):
        self.calls: list[str] = []
        self.exc_in_handle_error = None
        super().__init__(*args, **kwargs)

    def verify_request(self, request, client_address):
        self.calls.append("verify_request")
        return self.verify

    def handle_error(self, request, client_address):
        self.calls.append("handle_error")
        self.exc_in_handle_error = sys.exc_info()[0]
        super().handle_error(request, client_address)


def _recording(name):
    def hook(self, *args):
        self.calls.append(name)
        return getattr(super(Recorder, self), name)(*args)

    hook.__name__ = name
    return hook


for _name in HOOKS:
    if _name != "verify_request":
        setattr(Recorder, _name, _recording(_name))


class Handler(socketserver.BaseRequestHandler):
    """Answers "ok", or raises what the server's `raise_in_handle` says."""

    def handle(self):
        self.server.calls.append("handle")
        recv_all(self.request)  # read the whole request: closing on unread data would reset
        error = getattr(self.server, "raise_in_handle", None)
        if error is not None:
            raise error("raised by the handler")
        self.request.sendall(b"ok")


@pytest.fixture
def server():
    with Recorder(LOCALHOST, Handler) as server:
        yield server


def one_request(server) -> socket.socket:
    """A client that has connected and sent its request, for handle_request() to serve."""
    client = connect(server.server_address)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    return client


def test_normal_request(server):
    with one_request(server) as client:
        server.handle_request()
        assert recv_all(client) == b"ok"
    assert server.calls == REQUEST + CLOSE


def test_verify_request_false_closes_once_and_never_builds_a_handler(server):
    server.verify = False
    with one_request(server) as client:
        server.handle_request()
        assert recv_all(client) == b""  # closed without an answer
    assert server.calls == ["get_request", "verify_request"] + CLOSE


def test_handler_exception_goes_to_handle_error_inside_the_except_block(server, capsys):
    server.raise_in_handle = ValueError
    with one_request(server) as client:
        server.handle_request()
        assert recv_all(client) == b""
    assert server.calls == REQUEST + ["handle_error"] + CLOSE
    assert server.exc_in_handle_error is ValueError  # sys.exc_info() was set
    err = capsys.readouterr().err
    assert "Exception occurred during processing of request from" in err
    assert "ValueError: raised by the handler" in err


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
def test_system_exit_and_keyboard_interrupt_propagate(server, error):
    server.raise_in_handle = error
    with one_request(server) as client:
        with pytest.raises(error, match="raised by the handler"):
            server.handle_request()
        assert recv_all(client) == b""  # the request was closed on the way out
    assert server.calls == REQUEST + CLOSE  # never handed to handle_error


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_propagate_out_of_serve_forever(error):
    def went_on():
        raise AssertionError("serve_forever() went on after %s" % error.__name__)

    with Recorder(LOCALHOST, Handler) as server:
        server.raise_in_handle = error
        server.service_actions = went_on  # the turn after the request must never come
        with one_request(server) as client:
            with pytest.raises(error):
                server.serve_forever(poll_interval=SOCKET_TIMEOUT)
            assert recv_all(client) == b""
    assert server.calls == REQUEST + CLOSE


def test_handle_request_timeout_calls_handle_timeout(server):
    server.timeout = 0.05
    server.handle_request()
    assert server.calls == ["handle_timeout"]


def test_handle_request_uses_the_smaller_of_socket_and_server_timeout(server):
    server.socket.settimeout(0.05)
    server.timeout = SOCKET_TIMEOUT
    server.handle_request()  # returns after the socket's 0.05 s, not the server's 10 s
    assert server.calls == ["handle_timeout"]
    assert server.socket.gettimeout() == 0.05


def test_service_actions_on_every_serve_forever_turn(server):
    requests = 5
    server.timeout = 0.01  # serve_forever must ignore it: no handle_timeout while idle
    with serving(server, poll_interval=0.01):
        for _ in range(requests):
            assert stream_request(server.server_address, b"x") == b"ok"
        served = len(server.calls)
        # Idle turns (poll timeouts) call it too.
        wait_until(lambda: server.calls[served:].count("service_actions") >= 3)
    calls = list(server.calls)
    assert [c for c in calls if c != "service_actions"] == (REQUEST + CLOSE) * requests
    after_each_request = [i for i, c in enumerate(calls) if c == "close_request"]
    for index in after_each_request:
        assert calls[index + 1] == "service_actions"
    assert "handle_timeout" not in calls  # serve_forever ignores self.timeout
