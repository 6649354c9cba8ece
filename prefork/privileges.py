"""Who workers run as: user and group resolved in the master, dropped in the child. Runs in: both.

Names are resolved before any fork, so that a wrong name is a configuration error (exit 2)
shown once, not a crash in every worker. The master keeps its privileges only to bind and to
signal its workers; the workers give them up before they load the app.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Callable

from prefork.errors import ConfigError

__all__ = ["resolve_user", "resolve_group", "privilege_dropper"]


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


def privilege_dropper(user: str | int | None, group: str | int | None) -> Callable[[], None] | None:
    """Called before fork: a function that the child calls to become *user*/*group*.

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

    def drop() -> None:
        """Called in the child after fork: group first, while we still may change it."""
        if os.geteuid() == 0:
            os.setgroups(os.getgrouplist(name, gid) if name else [gid])
        os.setgid(gid)
        os.setuid(uid)

    return drop
