"""The error log and the access log: formats, files, and reopening for logrotate. Runs in: both.

Rules:

1. ``setup`` owns one handler on the root logger and nothing else: handlers that others put on
   the root logger (the application's, pytest's) are left alone, and calling it again reuses
   or replaces its own handler, never adds a second one.
2. Every file this module opens is registered, and ``reopen`` reopens each one *in place*: the
   file at the path is opened anew and ``dup2``-ed onto the old descriptor. Whoever holds that
   descriptor (the logging handler, the access log, ``faulthandler``) then writes into the new
   file without being told, and no descriptor number is freed for a socket to reuse.
3. ``reopen`` runs in a main loop (the master's or a worker's, on USR1), never in a signal
   handler: it does I/O and logs its failures.
4. The access log is written once per request in the worker, so it bypasses the logging
   machinery: one line is formatted and copied into a buffer, which reaches the file at most
   ``ACCESS_FLUSH_INTERVAL`` after the previous flush while requests flow, on ``flush()`` (the
   worker's idle tick and its exit), and before any fork, so that no child inherits pending
   lines and writes them a second time.
5. Times are local wall-clock times with their UTC offset: ``[2026-11-22 10:00:00 +0000]`` in
   the text error log (gunicorn's form), ISO 8601 with milliseconds
   (``2026-11-22T10:00:00.123+00:00``) in the access log and in JSON.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import select
import sys
import time
import weakref
from typing import IO, Any, Callable

from prefork.errors import ConfigError
from prefork.privileges import denied, unreachable

__all__ = ["AccessLog", "JsonFormatter", "LEVELS", "OUTCOMES", "TEXT_FORMAT", "close", "configured", "error_stream",
           "reopen", "setup"]

log = logging.getLogger("prefork.log")

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# What ``AccessLog.record`` says about a request: served, the handler raised, verify_request
# said no.
OUTCOMES = ("ok", "error", "refused")

# gunicorn's error log line, which operators' parsers already know.
TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
_TEXT_DATEFMT = "%Y-%m-%d %H:%M:%S %z"

# Log files are readable by everyone and written by their owner, as nginx and logrotate's
# `create` make them; the process umask and the `umask` setting can narrow this further.
_LOG_FILE_MODE = 0o644
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

# A flush of a full access-log buffer is one write() of at most PIPE_BUF bytes: atomic on a
# pipe (stdout under a supervisor), so lines of workers sharing it never interleave. On a file
# (O_APPEND) it still saves 30 system calls out of 31 for 130-byte lines.
ACCESS_BUFFER = getattr(select, "PIPE_BUF", 4096)
# Measured on 2 cores, ext4: with two workers appending to one file, write() + flush per line
# costs ~4.4 µs against ~1 µs buffered (they contend for the inode lock), and ~1.8 µs even
# alone; so lines are buffered, and reach the file at most this long after the last flush.
ACCESS_FLUSH_INTERVAL = 0.1
# The access log's "-": the process's standard output, whatever sys.stdout has become.
_STDOUT_FD = 1
# A full disk fails every request: say so once in this long, not a thousand times a second.
_WRITE_ERROR_REPORT_INTERVAL = 10.0


# -- the error log ---------------------------------------------------------------------------


def setup(settings: Any) -> None:
    """Configure the root logger and the "prefork" tree from *settings*; may be called again.

    Reads ``loglevel`` (debug, info, warning, error, critical; default info), ``error_log``
    ("-" or None: stderr; else a file, appended to) and ``log_format`` (text or json). Raises
    ConfigError when a value is not allowed or the file cannot be opened.
    """
    level = _level(getattr(settings, "loglevel", "info"))
    formatter = _formatter(getattr(settings, "log_format", "text"))
    # The error log is opened before serve() sets the process umask: apply the setting's now.
    umask = getattr(settings, "umask", None)
    _STATE.file_mode = _LOG_FILE_MODE & ~umask if isinstance(umask, int) else _LOG_FILE_MODE
    handler = _error_handler_for(getattr(settings, "error_log", "-") or "-")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if handler not in root.handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("prefork").setLevel(level)


def configured() -> bool:
    """True once ``setup`` has installed the error log (and ``close`` has not removed it)."""
    return _STATE.error_handler is not None


def error_stream() -> IO[str]:
    """Where the error log writes now, e.g. for ``faulthandler.enable(file=...)`` in a worker.

    ``reopen`` keeps this object and its descriptor valid (they write into the new file); a
    ``setup`` that moves the error log elsewhere closes it.
    """
    handler = _STATE.error_handler
    return handler.stream if isinstance(handler, _FileHandler) else sys.stderr


def reopen() -> None:
    """Reopen every file this module opened, for logrotate (USR1). Never in a signal handler.

    A file that was moved away is created anew at its path. When the path cannot be opened,
    the failure is logged and the old file kept: no line is lost.
    """
    for path, file in list(_STATE.files):
        try:
            _reopen_in_place(path, file)
        except PermissionError:
            reason = unreachable(path, write=True) or f"cannot write {path}"
            log.error("cannot reopen log file %s: %s; still writing to the old file", path,
                      denied(reason, f"the log file {path}", "make the file and its directory writable by that user"))
        except OSError as exc:
            log.error("cannot reopen log file %s: %s; still writing to the old file", path, exc.strerror)


def close() -> None:
    """Remove the handler ``setup`` installed and close every file this module opened."""
    handler, _STATE.error_handler = _STATE.error_handler, None
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
    for _, file in list(_STATE.files):
        _STATE.forget(file)
        file.close()


def _level(name: Any) -> int:
    level = LEVELS.get(str(name or "info").lower())
    if level is None:
        raise ConfigError(f"setting 'loglevel': {name!r} is not allowed; expected one of: {', '.join(LEVELS)}")
    return level


def _formatter(name: Any) -> logging.Formatter:
    if _is_json(name):
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, _TEXT_DATEFMT)


def _is_json(log_format: Any) -> bool:
    if log_format not in (None, "text", "json"):
        raise ConfigError(f"setting 'log_format': {log_format!r} is not allowed; expected one of: text, json")
    return bool(log_format == "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, pid, message, and exc_info if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process if record.process is not None else os.getpid(),
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def _iso_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when each record comes (as logging's lastResort)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always the current sys.stderr


class _FileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to a line-buffered file of this module's, which ``reopen`` swaps underneath it."""

    def __init__(self, path: str) -> None:
        super().__init__(_open_text(path))
        self.path = path

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            _STATE.forget(self.stream)
            self.stream.close()
        super().close()


def _error_handler_for(target: str) -> logging.Handler:
    """The handler writing to *target*: the current one if it already does, else a new one."""
    current = _STATE.error_handler
    if current is not None and _target_of(current) == target:
        return current
    new = _StderrHandler() if target == "-" else _FileHandler(target)
    if current is not None:
        logging.getLogger().removeHandler(current)
        current.close()
    _STATE.error_handler = new
    return new


def _target_of(handler: logging.Handler) -> str:
    return handler.path if isinstance(handler, _FileHandler) else "-"


# -- files -----------------------------------------------------------------------------------


class _State:
    """What this module installed and opened: setup() is idempotent and reopen() complete."""

    def __init__(self) -> None:
        self.error_handler: logging.Handler | None = None
        self.files: list[tuple[str, IO[Any]]] = []
        self.file_mode = _LOG_FILE_MODE  # less the `umask` setting, if any (see setup)

    def register(self, path: str, file: IO[Any]) -> None:
        self.files.append((path, file))

    def forget(self, file: IO[Any]) -> None:
        self.files = [(path, f) for path, f in self.files if f is not file]


_STATE = _State()


def _open_fd(path: str, setting: str) -> int:
    try:
        return os.open(path, _APPEND_FLAGS, _STATE.file_mode)
    except OSError as exc:
        raise ConfigError(f"setting {setting!r}: cannot open {path!r}: {exc.strerror}") from exc


def _open_text(path: str) -> IO[str]:
    """A line-buffered text file appending to *path*, registered for reopen()."""
    file = open(_open_fd(path, "error_log"), "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    _STATE.register(path, file)
    return file


def _open_binary(path: str) -> IO[bytes]:
    """A buffered binary file appending to *path*, registered for reopen()."""
    file = open(_open_fd(path, "access_log"), "ab", buffering=ACCESS_BUFFER)
    _STATE.register(path, file)
    return file


def _reopen_in_place(path: str, file: IO[Any]) -> None:
    file.flush()
    fd = os.open(path, _APPEND_FLAGS, _STATE.file_mode)
    try:
        os.dup2(fd, file.fileno(), inheritable=False)
    finally:
        os.close(fd)


# -- the access log --------------------------------------------------------------------------


class AccessLog:
    """One line per request, written by the worker (see rule 4).

    Methods for the caller: ``record`` after each request, ``flush`` on idle turns of the loop
    and before ``os._exit``, ``close`` when done.
    """

    def __init__(self, file: IO[bytes], json_format: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._file = file
        self._json = json_format
        self._line = self._json_line if json_format else self._text_line
        self._clock = clock
        self._flushed = clock()
        self._quoted: dict[str, str] = {}  # listener names and outcomes, escaped once
        # The time up to the second, formatted once a second (see _new_second). Threads of a
        # thread-mode worker share it: a line written across a second boundary may show the
        # neighbouring second, never a malformed time.
        self._second = -1
        self._head = self._offset = ""
        self._error_reported = -_WRITE_ERROR_REPORT_INTERVAL
        _flush_before_fork(self)

    @classmethod
    def from_settings(cls, settings: Any) -> AccessLog | None:
        """None when ``access_log`` is unset; "-" is stdout (fd 1, as gunicorn's), else a file path.

        Raises ConfigError when ``log_format`` is not allowed or the file cannot be opened.
        """
        target = getattr(settings, "access_log", None)
        if target is None:
            return None
        json_format = _is_json(getattr(settings, "log_format", "text"))
        if target == "-":
            return cls(open(_STDOUT_FD, "wb", buffering=ACCESS_BUFFER, closefd=False), json_format)
        return cls(_open_binary(target), json_format)

    def record(self, client: str, listener: str, pid: int, duration: float, bytes_in: int | None,
               bytes_out: int | None, outcome: str, tls: str | None = None) -> None:
        """Log one request: *duration* in seconds, None for bytes not known, *outcome* in OUTCOMES,
        *tls* the version and cipher of a TLS connection ('TLSv1.3/TLS_AES_128_GCM_SHA256')."""
        line = self._line(time.time(), client, listener, pid, duration, bytes_in, bytes_out, outcome)
        if tls is not None:
            line = line[:-2] + f', "tls": {json.dumps(tls)}}}\n' if self._json else line[:-1] + f" tls={tls}\n"
        try:
            self._file.write(line.encode("utf-8", "backslashreplace"))
        except OSError as exc:
            self._report(exc)
        if self._clock() - self._flushed >= ACCESS_FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines now."""
        self._flushed = self._clock()
        if self._file.closed:
            return  # closed while a fork hook still knows us
        try:
            self._file.flush()
        except OSError as exc:
            self._report(exc)

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            _STATE.forget(self._file)
            self._file.close()

    def _text_line(self, now: float, client: str, listener: str, pid: int, duration: float,
                   bytes_in: int | None, bytes_out: int | None, outcome: str) -> str:
        second = int(now)
        if second != self._second:
            self._new_second(second)
        quoted = self._quoted
        return (f"{self._head}.{int((now - second) * 1000.0):03d}{self._offset} "
                f"{client if _plain(client) else json.dumps(client)} "
                f"{quoted.get(listener) or self._quote(listener)} pid={pid} {duration:.4f}s "
                f"in={'-' if bytes_in is None else bytes_in} out={'-' if bytes_out is None else bytes_out} "
                f"{quoted.get(outcome) or self._quote(outcome)}\n")

    def _json_line(self, now: float, client: str, listener: str, pid: int, duration: float,
                   bytes_in: int | None, bytes_out: int | None, outcome: str) -> str:
        second = int(now)
        if second != self._second:
            self._new_second(second)
        quoted = self._quoted
        return (f'{{"time": "{self._head}.{int((now - second) * 1000.0):03d}{self._offset}", '
                f'"client": {json.dumps(client)}, '
                f'"listener": {quoted.get(listener) or self._quote(listener)}, "worker_pid": {pid:d}, '
                f'"duration_ms": {duration * 1000.0:.3f}, '
                f'"bytes_in": {"null" if bytes_in is None else int(bytes_in)}, '
                f'"bytes_out": {"null" if bytes_out is None else int(bytes_out)}, '
                f'"outcome": {quoted.get(outcome) or self._quote(outcome)}}}\n')

    def _quote(self, text: str) -> str:
        """*text* escaped for this format, remembered: listener names and outcomes are few."""
        quoted = self._quoted[text] = json.dumps(text) if self._json or not _plain(text) else text
        return quoted

    def _new_second(self, second: int) -> None:
        """Format the part of the time up to *second* once, for every line within that second."""
        local = time.localtime(second)
        self._head = time.strftime("%Y-%m-%dT%H:%M:%S", local)
        self._offset = _utc_offset(local.tm_gmtoff)
        self._second = second

    def _report(self, exc: OSError) -> None:
        now = self._clock()
        if now - self._error_reported >= _WRITE_ERROR_REPORT_INTERVAL:
            self._error_reported = now
            log.error("cannot write the access log: %s; lines are being lost", exc.strerror or exc)


def _plain(text: str) -> bool:
    """Whether *text* can stand as one field of a text line as it is (else it is quoted)."""
    return bool(text) and text.isprintable() and " " not in text and '"' not in text


def _utc_offset(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    minutes = abs(seconds) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _flush_before_fork(access_log: AccessLog) -> None:
    """Flush *access_log* before every fork, so no child inherits (and writes again) its lines."""
    ref = weakref.ref(access_log)

    def flush() -> None:
        target = ref()
        if target is not None:
            target.flush()

    os.register_at_fork(before=flush)
