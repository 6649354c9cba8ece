"""Sockets handed over from outside: systemd socket activation and in-place upgrades. Runs in: master.

Rules: a socket passed in is wrapped in exactly one socket object (two objects on one fd means
one closes the descriptor under the other), made non-inheritable, and its environment variables
are left for the caller to unset; only ``prefork.listeners.inherit_env`` (which writes FDS_ENV
with ``env_entry``) marks sockets inheritable, for the re-exec of an upgrade. This module knows
sockets and environment variables, not listeners: prefork.listeners builds on it.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import urllib.parse
from typing import Mapping, Sequence

from prefork.bindspec import DIGITS, MAX_FD, failure_reason as _reason
from prefork.errors import ConfigError, ListenerError

__all__ = ["FDS_ENV", "UPGRADE_PARENT_ENV", "InheritedSockets", "env_entry", "inherited_groups", "inherited_listeners",
           "no_systemd_reason", "socket_activated", "systemd_fds", "systemd_listeners", "upgrade_parent"]

log = logging.getLogger("prefork.listeners")

# sd_listen_fds(3): passed sockets start at fd 3, after stdin, stdout and stderr.
_SD_LISTEN_FDS_START = 3
# The variable that hands the listeners to a master re-executed by USR2: "FD:SPEC;FD:SPEC...".
FDS_ENV = "PREFORK_FDS"
# Characters of a spec text left as they are in PREFORK_FDS; ';' (the separator) and '%' are
# escaped, so a Unix path containing them survives the round trip.
_ENV_SAFE = ":/[]@!$&'()*+,=~ "


# -- systemd socket activation ---------------------------------------------------------------------


def systemd_listeners(environ: Mapping[str, str]) -> list[tuple[str | None, socket.socket]]:
    """The sockets systemd passed to this process, with their names (LISTEN_FDNAMES).

    Empty unless LISTEN_PID is this process. Each fd gets FD_CLOEXEC; non-socket fds are
    skipped. *environ* is not changed: the caller unsets LISTEN_PID, LISTEN_FDS and
    LISTEN_FDNAMES so that children do not see them.
    """
    found = []
    for name, fd in systemd_fds(environ):
        try:
            os.set_inheritable(fd, False)
            found.append((name, socket.socket(fileno=fd)))
        except OSError as exc:
            log.warning("ignoring fd %d passed by systemd: %s", fd, _reason(exc))
    return found


def socket_activated(environ: Mapping[str, str]) -> int:
    """How many sockets came from systemd socket activation; 0 if none.

    Those systemd passed to this process (LISTEN_FDS for our LISTEN_PID), or, in a master
    started by an upgrade (USR2), those its socket-activated predecessor handed over.
    """
    handed_over = {fd for fd, text in _env_entries(environ) if text.partition(":")[0] == "systemd"}
    return len(systemd_fds(environ)) or len(handed_over)


def systemd_fds(environ: Mapping[str, str]) -> list[tuple[str | None, int]]:
    """(name, fd) of every fd passed to this process by socket activation; nothing is wrapped."""
    if not _is_our_pid(environ.get("LISTEN_PID", "")) or "LISTEN_FDS" not in environ:
        return []
    count_text = environ.get("LISTEN_FDS", "")
    if not DIGITS.fullmatch(count_text) or len(count_text) > 6:
        raise ListenerError("systemd", f"LISTEN_FDS={count_text!r} is not a number of file descriptors")
    count, limit = int(count_text), _open_files_limit()
    if _SD_LISTEN_FDS_START + count > limit:
        raise ListenerError("systemd", f"LISTEN_FDS={count_text!r} is more file descriptors than this "
                                       f"process may have open ({limit})")
    names: list[str | None] = list(environ.get("LISTEN_FDNAMES", "").split(":"))
    if len(names) != count:
        if "LISTEN_FDNAMES" in environ:
            log.warning("LISTEN_FDNAMES has %d names for %d sockets: ignoring the names", len(names), count)
        names = [None] * count
    return [(name or None, _SD_LISTEN_FDS_START + i) for i, name in enumerate(names)]


def _open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else MAX_FD


def _is_our_pid(text: str) -> bool:
    return bool(DIGITS.fullmatch(text)) and len(text) < 20 and int(text) == os.getpid()


def no_systemd_reason(environ: Mapping[str, str]) -> str:
    """Why a systemd bind spec found no socket: what the environment says about activation."""
    if "LISTEN_FDS" not in environ or "LISTEN_PID" not in environ:
        return ("LISTEN_FDS was not set for this process: start it from a systemd socket unit "
                "(or systemd-socket-activate) to use systemd sockets")
    if not _is_our_pid(environ["LISTEN_PID"]):
        return (f"LISTEN_FDS was set for process {environ['LISTEN_PID']}, not for this one "
                f"({os.getpid()}): the sockets were passed to another process")
    return "systemd passed no sockets (LISTEN_FDS=0)"


# -- in-place upgrade (re-exec) --------------------------------------------------------------------


class InheritedSockets(dict[str, socket.socket]):
    """Spec text -> inherited socket, as ``inherited_listeners`` returns it.

    Each socket is listed under the spec the user gave and under its bound name. ``groups``
    keeps every socket of a spec when there are several (systemd sockets, a spec given twice),
    which a plain mapping of one socket per text cannot.
    """

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[str, list[socket.socket]] = {}

    def add(self, text: str, sock: socket.socket) -> None:
        group = self.groups.setdefault(text, [])
        if sock not in group:
            group.append(sock)
        self.setdefault(text, sock)


def env_entry(fd: int, text: str) -> str:
    """One entry of FDS_ENV: the socket *fd* handed over under the spec *text* (see ``inherit_env``)."""
    return f"{fd}:{urllib.parse.quote(text, safe=_ENV_SAFE, errors='surrogateescape')}"


def inherited_listeners(environ: Mapping[str, str]) -> InheritedSockets:
    """The sockets a previous master handed over in PREFORK_FDS, by spec text. Call it once.

    Pass the result to ``bind_all(..., inherited=...)``. Each fd is wrapped in one socket
    object (non-inheritable); every call wraps them again, so call it once and close what is
    not used (bind_all does). *environ* is not changed: the caller unsets PREFORK_FDS.
    """
    found = InheritedSockets()
    by_fd: dict[int, socket.socket] = {}
    # Every entry is checked before any fd is wrapped: a malformed variable touches none.
    entries = _env_entries(environ)
    try:
        for fd, text in entries:
            if fd not in by_fd:
                by_fd[fd] = _inherited_socket(fd, text)
            found.add(text, by_fd[fd])
    except BaseException:
        for sock in by_fd.values():
            sock.close()
        raise
    return found


def _env_entries(environ: Mapping[str, str]) -> list[tuple[int, str]]:
    """(fd, spec text) of each PREFORK_FDS entry; ListenerError for a malformed one."""
    return [_parse_env_entry(entry) for entry in filter(None, environ.get(FDS_ENV, "").split(";"))]


def _parse_env_entry(entry: str) -> tuple[int, str]:
    number, sep, quoted = entry.partition(":")
    if not sep or not DIGITS.fullmatch(number) or len(number) > 10 or int(number) > MAX_FD or not quoted:
        raise ListenerError(FDS_ENV, f"entry {entry!r} is not FD:SPEC (a file descriptor number, "
                                      f"':' and a bind spec)")
    return int(number), urllib.parse.unquote(quoted, errors="surrogateescape")


def _inherited_socket(fd: int, text: str) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError(text, f"inherited file descriptor {fd} ({FDS_ENV}): {_reason(exc)}") from exc


def inherited_groups(inherited: Mapping[str, socket.socket]) -> Mapping[str, Sequence[socket.socket]]:
    """Every socket of each spec text: InheritedSockets' groups, or one per text of a plain mapping."""
    groups = getattr(inherited, "groups", None)
    return groups if groups is not None else {text: [sock] for text, sock in inherited.items()}


# -- the master an upgraded master replaces --------------------------------------------------------

# Set in the environment of a master started by USR2, naming the master it replaces.
UPGRADE_PARENT_ENV = "PREFORK_UPGRADE_PARENT"


def upgrade_parent(environ: Mapping[str, str]) -> int:
    """The pid in PREFORK_UPGRADE_PARENT (0 when unset); ConfigError for anything but a pid.

    The new master signals that pid once its workers accept, and only if it is its parent.
    """
    text = environ.get(UPGRADE_PARENT_ENV, "")
    if not text:
        return 0
    if not DIGITS.fullmatch(text) or len(text) > 10 or int(text) > MAX_FD:
        raise ConfigError(f"{UPGRADE_PARENT_ENV}={text!r} is not a process id; it is set by a master "
                          "upgrading in place (USR2), never by hand")
    return int(text)
