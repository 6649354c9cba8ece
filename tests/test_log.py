"""prefork.log: error log formats and files, reopen for logrotate, the access log."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import types
from pathlib import Path
from typing import Any, Iterator

import pytest

from prefork import log
from prefork.errors import ConfigError

TEXT_LINE = re.compile(
    r"\[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4})\] \[(?P<pid>\d+)\] \[(?P<level>[A-Z]+)\] "
    r"(?P<logger>[\w.]+): (?P<message>.*)"
)
# A field is bare, or quoted and escaped as a JSON string when it holds a space or a control character.
FIELD = r'"(?:[^"\\]|\\.)*"|[^\s"]+'
ACCESS_TEXT_LINE = re.compile(
    rf"(?P<time>\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}[+-]\d\d:\d\d) (?P<client>{FIELD}) (?P<listener>{FIELD}) "
    r"pid=(?P<pid>\d+) (?P<duration>\d+\.\d{4})s in=(?P<bytes_in>\d+|-) out=(?P<bytes_out>\d+|-) "
    r"(?P<outcome>\w+)"
)


def settings(**values: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**values)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test gets the root logger back as it found it, and prefork.log's files closed."""
    root, tree = logging.getLogger(), logging.getLogger("prefork")
    handlers, root_level, tree_level = list(root.handlers), root.level, tree.level
    yield
    log.close()
    root.handlers[:] = handlers
    root.setLevel(root_level)
    tree.setLevel(tree_level)


def message(line: str) -> str:
    match = TEXT_LINE.fullmatch(line)
    assert match, line
    return match["message"]


def client(line: str) -> str:
    match = ACCESS_TEXT_LINE.fullmatch(line)
    assert match, line
    return match["client"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if type(h).__module__ == "prefork.log"]


def assert_recent(stamp: datetime.datetime) -> None:
    assert stamp.tzinfo is not None
    age = datetime.datetime.now(datetime.timezone.utc) - stamp
    assert datetime.timedelta(seconds=-1) < age < datetime.timedelta(seconds=60)


# -- error log -------------------------------------------------------------------------------


def test_text_format_to_file(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log.setup(settings(loglevel="info", error_log=str(path), log_format="text"))
    logging.getLogger("prefork.test").info("hello %s", "world")

    [line] = lines(path)
    match = TEXT_LINE.fullmatch(line)
    assert match, line
    assert (match["pid"], match["level"], match["logger"], match["message"]) == (
        str(os.getpid()), "INFO", "prefork.test", "hello world")
    assert_recent(datetime.datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S %z"))


def test_json_format_with_exception(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log.setup(settings(loglevel="info", error_log=str(path), log_format="json"))
    logger = logging.getLogger("prefork.test")
    logger.warning("plain %d", 1)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed on %s", "request")

    first, second = (json.loads(line) for line in lines(path))
    assert {k: first[k] for k in ("level", "logger", "pid", "message")} == {
        "level": "WARNING", "logger": "prefork.test", "pid": os.getpid(), "message": "plain 1"}
    assert "exc_info" not in first
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first["time"])
    assert_recent(datetime.datetime.fromisoformat(first["time"]))
    assert second["level"] == "ERROR" and second["message"] == "failed on request"
    assert second["exc_info"].startswith("Traceback") and "RuntimeError: boom" in second["exc_info"]


def test_level_filters_records(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log.setup(settings(loglevel="warning", error_log=str(path)))
    logging.getLogger("prefork.arbiter").info("not written")
    logging.getLogger("app").info("not written either")
    logging.getLogger("prefork.arbiter").warning("written")
    logging.getLogger("app").error("written too")
    assert [message(line) for line in lines(path)] == ["written", "written too"]

    log.setup(settings(loglevel="debug", error_log=str(path)))
    logging.getLogger("prefork.worker").debug("now debug is written")
    assert lines(path)[-1].endswith("[DEBUG] prefork.worker: now debug is written")


def test_setup_twice_keeps_one_handler(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    for _ in range(2):
        log.setup(settings(error_log=str(path)))
    assert len(our_handlers()) == 1
    logging.getLogger("prefork.test").info("once")
    assert len(lines(path)) == 1


def test_setup_elsewhere_moves_the_error_log(tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    log.setup(settings(error_log=str(first)))
    logging.getLogger("prefork.test").info("one")
    log.setup(settings(error_log=str(second), log_format="json"))
    logging.getLogger("prefork.test").info("two")

    assert [message(line) for line in lines(first)] == ["one"]
    assert [json.loads(line)["message"] for line in lines(second)] == ["two"]
    assert len(our_handlers()) == 1


def test_stderr_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup(settings())
    logging.getLogger("prefork.test").info("to stderr")
    err = capsys.readouterr().err.splitlines()
    assert [message(line) for line in err] == ["to stderr"]
    assert log.error_stream() is __import__("sys").stderr


def test_other_handlers_are_left_alone(tmp_path: Path) -> None:
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    log.setup(settings(error_log=str(tmp_path / "error.log")))
    log.setup(settings())
    assert foreign in logging.getLogger().handlers


@pytest.mark.parametrize("name, value", [("loglevel", "verbose"), ("log_format", "xml")])
def test_bad_values_are_config_errors(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*{value}"):
        log.setup(settings(**{name: value}))


def test_unopenable_error_log_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'error_log'.*no-such-dir"):
        log.setup(settings(error_log=str(tmp_path / "no-such-dir" / "error.log")))


# -- reopen ----------------------------------------------------------------------------------


def test_reopen_after_rotation_writes_a_new_file(tmp_path: Path) -> None:
    path, rotated = tmp_path / "error.log", tmp_path / "error.log.1"
    log.setup(settings(error_log=str(path)))
    logger = logging.getLogger("prefork.test")
    logger.info("before")
    path.rename(rotated)
    logger.info("after the move, before reopen")
    log.reopen()
    logger.info("after reopen")

    assert [message(line) for line in lines(rotated)] == [
        "before", "after the move, before reopen"]
    assert [message(line) for line in lines(path)] == ["after reopen"]


def test_reopen_keeps_the_descriptor_for_faulthandler(tmp_path: Path) -> None:
    """What faulthandler holds (error_stream's descriptor) follows the rotation too."""
    path = tmp_path / "error.log"
    log.setup(settings(error_log=str(path)))
    fd = log.error_stream().fileno()
    path.rename(tmp_path / "error.log.1")
    log.reopen()
    os.write(fd, b"raw dump\n")
    assert lines(path) == ["raw dump"]
    assert log.error_stream().fileno() == fd


def test_reopen_failure_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log.setup(settings(error_log=str(directory / "error.log")))
    directory.rename(tmp_path / "moved")  # the path's directory is gone: the path cannot be opened
    log.reopen()
    logging.getLogger("prefork.test").info("still here")

    messages = [message(line) for line in lines(tmp_path / "moved" / "error.log")]
    assert messages[0].startswith("cannot reopen log file") and messages[1:] == ["still here"]


def test_reopen_covers_the_access_log(tmp_path: Path) -> None:
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    access = log.AccessLog.from_settings(settings(access_log=str(path)))
    assert access is not None
    access.record("127.0.0.1:1", "tcp://127.0.0.1:9000", 1, 0.001, 1, 1, "ok")
    path.rename(rotated)
    log.reopen()  # flushes what was pending into the old file first
    access.record("127.0.0.1:2", "tcp://127.0.0.1:9000", 1, 0.001, 1, 1, "ok")
    access.close()

    assert [client(line) for line in lines(rotated)] == ["127.0.0.1:1"]
    assert [client(line) for line in lines(path)] == ["127.0.0.1:2"]


# -- access log ------------------------------------------------------------------------------


def test_access_log_off_when_unset() -> None:
    assert log.AccessLog.from_settings(settings()) is None
    assert log.AccessLog.from_settings(settings(access_log=None, log_format="json")) is None


def test_access_log_text(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = log.AccessLog.from_settings(settings(access_log=str(path), log_format="text"))
    assert access is not None
    access.record("127.0.0.1:5555", "tcp://127.0.0.1:9000", 123, 0.00123, 12, 34, "ok")
    access.record("[::1]:6000", "unix:/run/my echo.sock", 124, 2.5, None, None, "refused")
    access.close()

    first, second = (ACCESS_TEXT_LINE.fullmatch(line) for line in lines(path))
    assert first and second, lines(path)
    assert first.groupdict() | {"time": None} == {
        "time": None, "client": "127.0.0.1:5555", "listener": "tcp://127.0.0.1:9000", "pid": "123",
        "duration": "0.0012", "bytes_in": "12", "bytes_out": "34", "outcome": "ok"}
    assert_recent(datetime.datetime.fromisoformat(first["time"]))
    # A listener name with a space is quoted, so the line still splits into the same fields.
    assert json.loads(second["listener"]) == "unix:/run/my echo.sock"
    assert (second["client"], second["bytes_in"], second["bytes_out"], second["outcome"]) == (
        "[::1]:6000", "-", "-", "refused")


def test_access_log_text_quotes_unsafe_fields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = log.AccessLog.from_settings(settings(access_log=str(path)))
    assert access is not None
    access.record("evil\nforged line", "unix:/run/a b.sock", 1, 0.0, 0, 0, "ok")
    access.close()

    [line] = lines(path)  # the newline did not forge a second line
    match = ACCESS_TEXT_LINE.fullmatch(line)
    assert match, line
    assert json.loads(match["client"]) == "evil\nforged line"
    assert json.loads(match["listener"]) == "unix:/run/a b.sock"


def test_access_log_json(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = log.AccessLog.from_settings(settings(access_log=str(path), log_format="json"))
    assert access is not None
    access.record("127.0.0.1:5555", "tcp://127.0.0.1:9000", 123, 0.0012345, 12, 34, "ok")
    access.record("unix", "unix:/run/\"quoted\".sock", 124, 1.5, None, None, "error")
    access.close()

    first, second = (json.loads(line) for line in lines(path))
    assert set(first) == {"time", "client", "listener", "worker_pid", "duration_ms", "bytes_in", "bytes_out",
                          "outcome"}
    assert {k: v for k, v in first.items() if k != "time"} == {
        "client": "127.0.0.1:5555", "listener": "tcp://127.0.0.1:9000", "worker_pid": 123,
        "duration_ms": 1.234, "bytes_in": 12, "bytes_out": 34, "outcome": "ok"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first["time"])
    assert_recent(datetime.datetime.fromisoformat(first["time"]))
    assert (second["listener"], second["bytes_in"], second["bytes_out"], second["outcome"]) == (
        'unix:/run/"quoted".sock', None, None, "error")
    assert second["duration_ms"] == 1500.0


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_access_log_shows_the_tls_version_and_cipher_of_a_tls_connection(tmp_path: Path, log_format: str) -> None:
    path = tmp_path / "access.log"
    access = log.AccessLog.from_settings(settings(access_log=str(path), log_format=log_format))
    assert access is not None
    access.record("127.0.0.1:5555", "tcp://127.0.0.1:9443", 1, 0.0, 1, 2, "ok", "TLSv1.3/TLS_AES_128_GCM_SHA256")
    access.record("127.0.0.1:5556", "tcp://127.0.0.1:9000", 1, 0.0, 1, 2, "ok")
    access.close()
    tls, plain = lines(path)
    if log_format == "json":
        assert json.loads(tls)["tls"] == "TLSv1.3/TLS_AES_128_GCM_SHA256" and "tls" not in json.loads(plain)
    else:
        assert tls.endswith(" ok tls=TLSv1.3/TLS_AES_128_GCM_SHA256") and plain.endswith(" ok")


def test_access_log_dash_is_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    access = log.AccessLog.from_settings(settings(access_log="-", log_format="json"))
    assert access is not None
    access.record("127.0.0.1:5555", "tcp://127.0.0.1:9000", 7, 0.0, 1, 2, "ok")
    access.close()
    out, err = capfd.readouterr()
    assert json.loads(out)["worker_pid"] == 7 and err == ""
    os.fstat(1)  # closing the access log left the process's stdout open


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_access_log_buffers_until_the_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock()
    start = clock.now
    with contextlib.closing(log.AccessLog(open(path, "ab", buffering=log.ACCESS_BUFFER), clock=clock)) as access:
        access.record("c:1", "l", 1, 0.0, 0, 0, "ok")
        assert path.read_bytes() == b""  # buffered: no write() on the request path
        clock.now = start + log.ACCESS_FLUSH_INTERVAL / 2
        access.record("c:2", "l", 1, 0.0, 0, 0, "ok")
        assert path.read_bytes() == b""
        clock.now = start + log.ACCESS_FLUSH_INTERVAL
        access.record("c:3", "l", 1, 0.0, 0, 0, "ok")
        assert [client(line) for line in lines(path)] == ["c:1", "c:2", "c:3"]
        access.record("c:4", "l", 1, 0.0, 0, 0, "ok")
        assert len(lines(path)) == 3
        access.flush()
        assert len(lines(path)) == 4


def test_access_log_is_flushed_before_fork(tmp_path: Path) -> None:
    """A child that flushes its copy must not write the parent's pending line a second time."""
    path = tmp_path / "access.log"
    with contextlib.closing(log.AccessLog(open(path, "ab", buffering=log.ACCESS_BUFFER), clock=FakeClock())) as access:
        access.record("parent:1", "l", 1, 0.0, 0, 0, "ok")
        assert path.read_bytes() == b""
        pid = os.fork()
        if pid == 0:
            try:
                access.flush()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert [client(line) for line in lines(path)] == ["parent:1"]


def test_unopenable_access_log_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'access_log'.*no-such-dir"):
        log.AccessLog.from_settings(settings(access_log=str(tmp_path / "no-such-dir" / "access.log")))
