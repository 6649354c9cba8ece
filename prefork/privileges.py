"""Who workers run as: user and group resolved in the master, dropped in the child. Runs in: both.

Names are resolved before any fork, so that a wrong name is a configuration error (exit 2)
shown once, not a crash in every worker. The master keeps its privileges only to bind and to
signal its workers; the workers give them up before they load the app.

What the workers' user cannot reach is said with that user, the path that stops it and the
fix (``unreachable``, ``denied``): in a worker after the drop, and in the master, which checks
the working directory and the log files once at start while ``acting_as`` the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import logging
import os
import pwd
from pathlib import Path
from typing import Iterator

from prefork.errors import ConfigError

__all__ = ["resolve_user", "resolve_group", "privilege_dropper", "Switch", "whoami", "unreachable", "denied", "acting_as",
           "check_reach"]

log = logging.getLogger("prefork.privileges")


def resolve_user(user: str | int) -> tuple[int, int, str]:
    """(uid, primary gid, name) of *user*, a name or a numeric id; ConfigError if unknown."""
    try:
        entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
    except KeyError:
        raise ConfigError(f"setting 'user': no such user {user!r}") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def resolve_group(group: str | int) -> int:
    """The gid of *group*, a name or a numeric id; ConfigError if unknown."""
    try:
        return grp.getgrgid(int(group)).gr_gid if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ConfigError(f"setting 'group': no such group {group!r}") from None


def privilege_dropper(user: str | int | None, group: str | int | None) -> Switch | None:
    """Called before fork: the switch that the child calls to become *user*/*group*.

    None when neither is set. Raises ConfigError now for unknown names, or when the master
    lacks the privilege to switch (it must run as root to run workers as another user).
    """
    if user is None and group is None:
        return None
    uid, gid, name = resolve_user(user) if user is not None else (os.getuid(), os.getgid(), "")
    if group is not None:
        gid = resolve_group(group)
    if os.geteuid() != 0 and (uid != os.geteuid() or gid != os.getegid()):
        raise ConfigError(f"settings 'user'/'group': switching to uid {uid} gid {gid} needs root; "
                          f"the master runs as uid {os.geteuid()}")
    return Switch(uid, gid, tuple(os.getgrouplist(name, gid) if name else [gid]))


@dataclasses.dataclass(frozen=True)
class Switch:
    """The workers' ids; calling it switches this process to them for good."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups: the user's own, never the master's

    def __call__(self) -> None:
        """Called in the child after fork: group first, while we still may change it."""
        if os.geteuid() == 0:
            os.setgroups(self.groups)
        os.setgid(self.gid)
        os.setuid(self.uid)


# -- what the workers' user cannot reach ----------------------------------------------------------


def whoami() -> str:
    """'nobody (uid 65534)': the user this process acts as, for messages."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def unreachable(path: str, *, write: bool = False) -> str | None:
    """Why this process cannot read (or, with *write*, write) *path*: 'cannot enter /root', or None.

    The first directory on the way that it may not enter; else the path itself: a directory
    must be listable (an import lists it), a file readable or writable, and a file that does
    not exist yet creatable in its directory.
    """
    target = Path(os.path.abspath(path))
    for directory in reversed(target.parents):  # "/" first
        if not os.access(directory, os.X_OK, effective_ids=True):
            return f"cannot enter {directory}"
    if not os.path.lexists(target):
        parent_mode = os.W_OK | os.X_OK if write else os.X_OK
        return None if os.access(target.parent, parent_mode, effective_ids=True) else f"cannot write {target.parent}"
    mode = os.W_OK if write else os.R_OK | (os.X_OK if target.is_dir() else 0)
    return None if os.access(target, mode, effective_ids=True) else f"cannot {'write' if write else 'read'} {target}"


def denied(reason: str, what: str, fix: str) -> str:
    """'workers run as nobody (uid 65534), which cannot enter /root: Permission denied (the app's
    module /root/x/app.py); make ... or choose another user'."""
    return (f"workers run as {whoami()}, which {reason}: {os.strerror(errno.EACCES)} ({what}); "
            f"{fix} or choose another user")


@contextlib.contextmanager
def acting_as(switch: Switch | None) -> Iterator[bool]:
    """Called in the master: within the block, file access is checked as the workers' user.

    Yields False (nothing to check) unless the master is root and the workers switch users.
    The effective ids change, not the real ones, and are root's again after the block.
    """
    if switch is None or os.geteuid() != 0:
        yield False
        return
    saved_groups, saved_gid = os.getgroups(), os.getegid()
    try:
        os.setgroups(switch.groups)
        os.setegid(switch.gid)
        os.seteuid(switch.uid)
        switched = True
    except PermissionError:  # a user namespace that denies setgroups: the checks are a nicety
        switched = False
    try:
        yield switched
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)
        os.setgroups(saved_groups)


def check_reach(switch: Switch | None, cwd: str, log_files: list[str]) -> None:
    """Called in the master before fork: warn of what the workers' user cannot reach.

    Its working directory (relative paths, imports from it) and the log files it reopens on
    USR1. Warnings, not errors: a worker that needs neither serves anyway.
    """
    with acting_as(switch) as switched:
        if not switched:
            return
        problems = [(unreachable(cwd), f"the working directory {cwd}, where relative paths and imports from it "
                                       f"fail in the workers", "start the master in a directory it can read")]
        problems += [(unreachable(path, write=True), f"the log file {path}, which the workers reopen on USR1",
                      "make the file and its directory writable by that user") for path in log_files]
        messages = [denied(reason, what, fix) for reason, what, fix in problems if reason]
    for message in messages:
        log.warning("%s", message)
