"""mode = "asyncio" (issue 15): event-loop workers under the same master, in real processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from prefork.errors import EXIT_APP_LOAD
from tests.integration.conftest import _read_line
from tests.support import SOCKET_TIMEOUT, datagram_request, stream_request, wait_until

pytestmark = pytest.mark.integration

AIO_APPS = "tests.integration.aio_apps"


def connect(address: object) -> socket.socket:
    return socket.create_connection(address, timeout=SOCKET_TIMEOUT)  # type: ignore[arg-type]


def ask(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\n")
    return _read_line(sock)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_echo_serves_every_kind_of_listener_in_asyncio_mode(start_master, sock_dir: Path, loop: str) -> None:
    stream, datagrams = sock_dir / "s", sock_dir / "d"
    master = start_master(app="workers.echo", mode="asyncio", loop=loop,
                          bind=["tcp://127.0.0.1:0", "udp://127.0.0.1:0", f"unix:{stream}", f"unix-dgram:{datagrams}"])
    assert master.request(b"hello") == b"hello"
    assert datagram_request(master.address(1), b"ping") == b"ping"
    assert stream_request(str(stream), b"one\ntwo", socket.AF_UNIX) == b"one\ntwo"
    assert datagram_request(str(datagrams), b"dgram", socket.AF_UNIX, bind=str(sock_dir / "c")) == b"dgram"
    long_line = bytes(range(1, 251)) * 1000 + b"\n"  # 250 kB: several MAX_LINE pieces
    assert stream_request(master.address(0), long_line) == long_line


@pytest.mark.parametrize("loop, expected", [("uvloop", b"uvloop"), ("asyncio", b"asyncio")])
def test_the_class_form_gets_reader_writer_and_server_on_the_chosen_loop(start_master, loop: str,
                                                                        expected: bytes) -> None:
    master = start_master(app=f"{AIO_APPS}:handlers", mode="asyncio", workers=1, loop=loop)
    with connect(master.address()) as sock:
        pid, listener = _read_line(sock).split()
        assert listener.decode() == master.info["listeners"][0]
        assert ask(sock, b"pid") == pid
        assert ask(sock, b"loop") == expected


def test_a_failing_handler_is_logged_its_connection_closed_and_the_worker_goes_on(start_master) -> None:
    master = start_master(app=AIO_APPS, mode="asyncio", workers=1)
    with connect(master.address()) as sock:
        pid = ask(sock, b"pid")
        sock.sendall(b"raise\n")
        assert sock.recv(100) == b""  # closed
    wait_until(lambda: "RuntimeError: the handler failed on purpose" in master.log(), 10)
    assert "Traceback" in master.log()
    assert master.request(b"pid") == pid


def test_a_synchronous_handler_is_refused_in_asyncio_mode(start_master) -> None:
    master = start_master(app="tests.integration.apps", mode="asyncio", ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "has no AsyncStreamHandler" in master.log()
    assert "StreamHandler is a synchronous handler" in master.log()


def test_an_asyncio_handler_is_refused_in_sync_mode(start_master) -> None:
    master = start_master(app=f"{AIO_APPS}:AsyncStreamHandler", mode="sync", ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "is an asyncio stream handler; serve it with mode asyncio" in master.log()
