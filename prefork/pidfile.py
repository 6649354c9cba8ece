"""The master's pidfile: written atomically, refused while a live master owns it. Runs in: master.

Rules:

1. The file holds one decimal pid and a newline. It is never seen half-written: the pid is
   written to a temporary file in the same directory, which is then linked (first master) or
   renamed (stale file) into place.
2. A pidfile naming a live process other than us is never replaced: that is another master.
   A stale one (dead or zombie pid, garbage, empty) is replaced, and the log says so.
3. The master removes or moves the file only while it still names the master: during an
   upgrade the new master may own the path by then.
4. ``read_pid`` is for the command line: it returns a pid only for a live process, because the
   CLI sends signals to it (a garbage pid of 0 or -1 would signal a whole process group).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import psutil

from prefork.errors import PidfileError

__all__ = ["Pidfile", "read_pid", "is_running"]

log = logging.getLogger("prefork.pidfile")

# rw-r--r--: anyone may read the pid (ps, monitoring, the CLI), only its owner may change it.
_MODE = 0o644
# A pidfile is a few bytes; read no more than this of a file that is something else.
_READ_LIMIT = 4096
# pid_t is a signed 32-bit int; anything larger is garbage, not a process.
_PID_MAX = 2**31 - 1
# One decimal number, nothing else but surrounding whitespace; no sign, no leading zero.
_PID_TEXT = re.compile(r"\s*([1-9][0-9]*)\s*")


class Pidfile:
    """The pidfile at *path*, owned by this master once ``create`` has written it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Absolute, so a later chdir (the master may change directory) does not move it.
        self._path = os.path.abspath(os.fspath(path))
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"<Pidfile {self._path} pid={self._pid}>"

    @property
    def path(self) -> str:
        return self._path

    @property
    def pid(self) -> int | None:
        """The pid this object wrote, or None before ``create``."""
        return self._pid

    def create(self, pid: int | None = None) -> None:
        """Write *pid* (default: ours); PidfileError if a live master owns the file."""
        pid = os.getpid() if pid is None else pid
        _install(self._path, pid)
        self._pid = pid
        log.debug("wrote pidfile %s (pid %d)", self._path, pid)

    def rename(self, new_path: str | os.PathLike[str]) -> None:
        """Move our pidfile to *new_path* (``PATH.oldbin`` during an upgrade, and back)."""
        new_path = os.path.abspath(os.fspath(new_path))
        pid = os.getpid() if self._pid is None else self._pid
        _refuse_live_owner(new_path, pid)
        if _names(self._path, pid):
            _move(self._path, new_path)
        else:
            # Someone else owns the old path by now (or it was deleted): leave it, write anew.
            _install(new_path, pid)
        log.info("moved pidfile %s to %s", self._path, new_path)
        self._path, self._pid = new_path, pid

    def remove(self) -> None:
        """Delete the file if it still names us; a new master may own it by now.

        Never raises: the master calls this on its way out, where a pidfile it cannot remove
        is worth a warning, not a failed stop.
        """
        try:
            if self._pid is not None and _names(self._path, self._pid):
                os.unlink(self._path)
                log.debug("removed pidfile %s", self._path)
        except FileNotFoundError:
            pass  # removed by someone else between the read and the unlink: the goal is met
        except (OSError, PidfileError) as exc:
            log.warning("cannot remove pidfile %s: %s", self._path, exc)


def read_pid(path: str | os.PathLike[str]) -> int:
    """The pid of the live master named by the pidfile at *path*, for the command line."""
    path = os.path.abspath(os.fspath(path))
    text = _owner_text(path)
    if text is None:
        raise PidfileError(f"no master running: {path} does not exist")
    pid = _parse_pid(text)
    if pid is None:
        raise PidfileError(f"pidfile {path} does not contain a pid: {text[:40]!r}")
    if not is_running(pid):
        raise PidfileError(f"no master running: pidfile {path} names pid {pid}, "
                           f"which is not running (stale pidfile)")
    return pid


def is_running(pid: int) -> bool:
    """True if *pid* is a live process (not a thread, not a zombie), ours or another user's."""
    # psutil rather than os.kill(pid, 0): on Linux kill() also accepts thread ids, and a zombie
    # answers it; neither is a master. pid_exists treats EPERM (another user's process) as alive.
    if not psutil.pid_exists(pid):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _install(path: str, pid: int) -> None:
    """Put a file holding *pid* at *path*, unless a live process other than us owns it."""
    temp = _write_temp(path, pid)
    try:
        if not _link_new(temp, path):
            _replace_stale(temp, path, pid)
    finally:
        _unlink_quietly(temp)


def _link_new(temp: str, path: str) -> bool:
    """Link *temp* to *path* if nothing is there: of two masters starting at once, one wins."""
    try:
        os.link(temp, path)
    except OSError:
        # EEXIST: someone's file is there; anything else (a filesystem without hard links, a
        # directory in the way): _replace_stale decides, and reports what os.replace says.
        return False
    return True


def _replace_stale(temp: str, path: str, pid: int) -> None:
    text = _refuse_live_owner(path, pid)
    if text is not None and _parse_pid(text) not in (pid, os.getpid()):
        log.warning("replacing stale pidfile %s (it held %r, not a running process)",
                    path, text.strip()[:40])
    _move(temp, path)


def _refuse_live_owner(path: str, pid: int) -> str | None:
    """PidfileError if *path* names a live process other than us; else the file's text."""
    text = _owner_text(path)
    owner = None if text is None else _parse_pid(text)
    if owner is not None and owner not in (pid, os.getpid()) and is_running(owner):
        raise PidfileError(f"pidfile {path} belongs to running process {owner}; "
                           f"is another master running?")
    return text


def _write_temp(path: str, pid: int) -> str:
    directory, name = os.path.split(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            os.fchmod(fd, _MODE)  # mkstemp makes 0600; chmod is not subject to the umask
            file.write(f"{pid}\n")
    except OSError as exc:  # a full disk, a quota
        _unlink_quietly(temp)
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror}") from exc
    return temp


def _move(source: str, target: str) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {target}: {exc.strerror}") from exc


def _owner_text(path: str) -> str | None:
    """The file's text; None if it does not exist; PidfileError if it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read(_READ_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidfileError(f"cannot read pidfile {path}: {exc.strerror}") from exc


def _names(path: str, pid: int) -> bool:
    text = _owner_text(path)
    return text is not None and _parse_pid(text) == pid


def _parse_pid(text: str) -> int | None:
    match = _PID_TEXT.fullmatch(text)
    if match is None or len(match.group(1)) > len(str(_PID_MAX)):  # no 4,000-digit int()
        return None
    pid = int(match.group(1))
    return pid if pid <= _PID_MAX else None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # already linked and renamed away: nothing left to clean
