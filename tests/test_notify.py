"""sd_notify: real AF_UNIX datagram sockets standing in for systemd's notify socket."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from prefork import notify
from tests.support import SOCKET_TIMEOUT

# sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket in tmp_path, and an environment naming it as NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    assert len(path.encode()) <= _SUN_PATH_MAX, f"tmp_path too long for a socket: {path}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.bind(path)
        yield sock, {"NOTIFY_SOCKET": path}


def received(sock: socket.socket) -> list[str]:
    """The fields of the next message."""
    return sock.recv(65536).decode("utf-8").split("\n")


def assert_nothing_more(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)


def test_ready_with_status(manager: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = manager
    assert notify.ready("serving on 127.0.0.1:9000", environ=env) is True
    assert received(sock) == ["READY=1", "STATUS=serving on 127.0.0.1:9000"]
    assert_nothing_more(sock)


def test_ready_alone(manager: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = manager
    assert notify.ready(environ=env)
    assert received(sock) == ["READY=1"]


def test_messages_arrive_in_order(manager: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = manager
    assert notify.status("booting 4 workers", environ=env)
    assert notify.ready(environ=env)
    assert notify.mainpid(4242, environ=env)
    assert notify.stopping("graceful stop", environ=env)
    assert [received(sock) for _ in range(4)] == [
        ["STATUS=booting 4 workers"],
        ["READY=1"],
        ["MAINPID=4242"],
        ["STOPPING=1", "STATUS=graceful stop"],
    ]
    assert_nothing_more(sock)


def test_reloading_carries_monotonic_usec(manager: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = manager
    before = notify.monotonic_usec()
    assert notify.reloading("reloading configuration", environ=env)
    after = notify.monotonic_usec()
    first, stamp, status = received(sock)
    assert first == "RELOADING=1"
    assert status == "STATUS=reloading configuration"
    key, _, value = stamp.partition("=")
    assert key == "MONOTONIC_USEC" and value.isdigit()
    assert before <= int(value) <= after


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    # systemd compares it with its own CLOCK_MONOTONIC: microseconds, not seconds or ns.
    reference = time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000
    assert abs(notify.monotonic_usec() - reference) < 1_000_000


def test_abstract_socket() -> None:
    name = f"prefork-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.bind("\0" + name)
        assert notify.ready("up", environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == ["READY=1", "STATUS=up"]


def test_reads_os_environ_at_each_call(manager: tuple[socket.socket, dict[str, str]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sock, env = manager
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert notify.notify("READY=1")
    assert received(sock) == ["READY=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.notify("READY=1") is False
    assert_nothing_more(sock)


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_not_under_systemd(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="prefork.notify"):
        assert notify.ready(environ=env) is False
    assert not caplog.records, "no NOTIFY_SOCKET is the normal case, not worth a log line"


def test_nobody_listening(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)  # bound then closed: the file stays, nobody reads it
    with caplog.at_level(logging.DEBUG, logger="prefork.notify"):
        assert notify.stopping(environ={"NOTIFY_SOCKET": path}) is False
    assert any(path in r.getMessage() and "Connection refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["/nonexistent/notify.sock", "@prefork-test-nobody-{}"])
def test_no_such_socket(name: str, caplog: pytest.LogCaptureFixture) -> None:
    name = name.format(uuid.uuid4().hex)
    with caplog.at_level(logging.DEBUG, logger="prefork.notify"):
        assert notify.ready(environ={"NOTIFY_SOCKET": name}) is False
    assert [r for r in caplog.records if r.levelno == logging.DEBUG]


def test_socket_path_is_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("")
    assert notify.ready(environ={"NOTIFY_SOCKET": str(path)}) is False


def test_relative_path_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="prefork.notify"):
        assert notify.ready(environ={"NOTIFY_SOCKET": "notify.sock"}) is False
    assert any("notify.sock" in r.getMessage() for r in caplog.records)


def test_a_stream_socket_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        assert notify.ready(environ={"NOTIFY_SOCKET": path}) is False


def test_status_cannot_inject_fields(manager: tuple[socket.socket, dict[str, str]]) -> None:
    # A status built from user data must not be able to smuggle READY=1 or MAINPID= in.
    sock, env = manager
    assert notify.status("bad\nREADY=1\r\nMAINPID=1", environ=env)
    assert received(sock) == ["STATUS=bad READY=1 MAINPID=1"]


def test_mainpid_must_be_an_integer(manager: tuple[socket.socket, dict[str, str]]) -> None:
    _, env = manager
    with pytest.raises(ValueError):
        notify.mainpid("12\nREADY=1", environ=env)  # type: ignore[arg-type]
