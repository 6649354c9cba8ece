"""Where a master without a configured pidfile keeps it, and how the CLI finds it. Runs in: both.

Rules:

1. The default pidfile is per user and per service: ``DIR/NAME.pid`` (its scoreboard beside
   it), where DIR is the first usable of ``/run/prefork`` (root only), ``$XDG_RUNTIME_DIR/prefork``
   and ``prefork-UID`` under the temporary directory. A directory is usable if it is (or can be
   made) a real directory owned by this user that no one else may write to; the last one is
   created 0700, so there always is one, private to the user. Under systemd with
   ``RuntimeDirectory=``, ``$RUNTIME_DIRECTORY`` is the only directory, for the master and the
   control commands alike.
2. A second master of the same service, while the first runs, takes ``NAME@2.pid``, then
   ``NAME@3.pid``: service names never contain ``@`` (other characters than letters, digits,
   ``.``, ``_`` and ``-`` become ``_``).
3. The control commands look in every one of those directories, so a shell with another
   ``XDG_RUNTIME_DIR`` still finds the master. A pidfile naming a dead process (a master that
   was killed) is stale: it is skipped, never chosen.
4. The master removes its pidfile and scoreboard on stop, as for any pidfile.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Mapping

from prefork.errors import ConfigError, PidfileError
from prefork.pidfile import read_pid

__all__ = ["RunningMaster", "candidate_dirs", "default_pidfile", "find_pidfile", "running_masters",
           "service_name"]

# Root's runtime directory for services, as systemd's RuntimeDirectory= makes it (/run/NAME).
ROOT_RUN_DIR = "/run/prefork"
# The runtime directory's own subdirectory, under $XDG_RUNTIME_DIR (per user, made by logind).
XDG_SUBDIR = "prefork"
# A user's run directory is theirs alone: the pidfile says which process the CLI signals.
PRIVATE_MODE = 0o700
# Root's may be read by all, like /run itself: status is no secret, and the files are 0644.
ROOT_MODE = 0o755
# Instances of one service a user may run at once under default pidfiles (NAME.pid, NAME@2.pid...).
MAX_INSTANCES = 100
# Characters kept in a service name used as a file name; any other becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PIDFILE_NAME = re.compile(r"(?P<service>[^@]+?)(?:@(?P<instance>[0-9]+))?\.pid")


@dataclasses.dataclass(frozen=True)
class RunningMaster:
    """A live master found by its default pidfile."""

    service: str
    pid: int
    pidfile: str


def service_name(app: str) -> str:
    """The name of the service an app string names: 'workers.echo' -> 'echo', 'm:App' -> 'App'."""
    module, _, attr = app.partition(":")
    return attr.rpartition(".")[2] or module.rpartition(".")[2]


def candidate_dirs(environ: Mapping[str, str] | None = None) -> list[str]:
    """The directories a default pidfile may be in, in the order a master tries them."""
    environ = os.environ if environ is None else environ
    service_dir = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]  # systemd: a list, ours first
    if os.path.isabs(service_dir):
        return [service_dir]
    found = [ROOT_RUN_DIR] if os.geteuid() == 0 else []
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        found.append(os.path.join(runtime, XDG_SUBDIR))
    found.append(os.path.join(tempfile.gettempdir(), f"prefork-{os.geteuid()}"))
    return found


def default_pidfile(name: str, environ: Mapping[str, str] | None = None) -> str:
    """Called in the master at start: the pidfile of service *name* in the first usable directory."""
    directory = _usable_dir(candidate_dirs(environ))
    base = _UNSAFE.sub("_", name).lstrip(".") or "prefork"
    for instance in range(1, MAX_INSTANCES + 1):
        path = os.path.join(directory, f"{base}.pid" if instance == 1 else f"{base}@{instance}.pid")
        if _live(path) is None:
            return path
    raise ConfigError(f"{MAX_INSTANCES} masters of {base!r} already run with pidfiles in {directory}; "
                      f"give this one a pidfile (--pidfile FILE) or another name (--name NAME)")


def running_masters(name: str | None = None, environ: Mapping[str, str] | None = None) -> list[RunningMaster]:
    """Every live master with a default pidfile (of service *name*, if given); stale files skipped."""
    found = []
    for directory in dict.fromkeys(candidate_dirs(environ)):
        for path in sorted(Path(directory).glob("*.pid")) if _owned_dir(directory) else []:
            match = _PIDFILE_NAME.fullmatch(path.name)
            pid = _live(str(path)) if match else None
            if match and pid is not None and name in (None, match["service"]):
                found.append(RunningMaster(match["service"], pid, str(path)))
    return found


def find_pidfile(name: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The pidfile of the one running master (of service *name*); an error naming the choices."""
    masters = running_masters(name, environ)
    if len(masters) == 1:
        return masters[0].pidfile
    if not masters:
        which = f"of service {name!r} " if name else ""
        raise PidfileError(f"no master {which}running: no live pidfile in {', '.join(candidate_dirs(environ))} "
                           f"(where `prefork run` writes one unless given a pidfile); for a master elsewhere "
                           f"give --pidfile FILE, or set pidfile (-c FILE, [tool.prefork] in ./pyproject.toml, "
                           f"PREFORK_PIDFILE)")
    rows = "".join(f"\n  {m.service}  pid {m.pid}  {m.pidfile}" for m in masters)
    raise ConfigError(f"{len(masters)} masters are running; choose one with --name NAME or --pidfile FILE:{rows}")


def _live(path: str) -> int | None:
    try:
        return read_pid(path)
    except PidfileError:
        return None  # missing, garbage, or stale (its process is gone): no master there


def _usable_dir(candidates: list[str]) -> str:
    refused = []
    for directory in candidates:
        reason = _make_private(directory)
        if reason is None:
            return directory
        refused.append(f"{directory}: {reason}")
    raise ConfigError(f"no directory for the default pidfile ({'; '.join(refused)}); give --pidfile FILE")


def _make_private(directory: str) -> str | None:
    """Create *directory* if needed; why it cannot hold our pidfiles, or None if it can."""
    mode = ROOT_MODE if directory == ROOT_RUN_DIR else PRIVATE_MODE
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        pass  # checked below, whoever made it
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if _owned_dir(directory) else "not a directory of this user's that only it may write to"


def _owned_dir(directory: str) -> bool:
    """A real directory (no symlink) of this user's that no one else may write to."""
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
