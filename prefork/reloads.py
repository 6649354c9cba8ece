"""How the last reload went, in a file beside the pidfile. Runs in: both.

The master writes the file and the CLI (``prefork reload``) reads it.

Rules:

1. The master writes ``PIDFILE.reload`` (JSON, replaced atomically) when it takes a HUP and
   again when that reload ends; ``prefork reload`` compares the sequence number with the one
   it read before sending HUP, so it reports the outcome of its own signal, never an old one.
2. What the file says is what happened: a refused reload carries the error and its exit code;
   a started one the changes it applies (one line per setting) and the settings it could not
   apply with the way to apply them; then "reloaded" once every new worker accepts, or
   "cancelled" with the reason when the new workers could not start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

__all__ = ["ReloadReport", "write_report", "read_report", "report_path", "REFUSED", "STARTED", "RELOADED",
           "CANCELLED"]

REFUSED, STARTED, RELOADED, CANCELLED = "refused", "started", "reloaded", "cancelled"


@dataclasses.dataclass(frozen=True)
class ReloadReport:
    seq: int  # the master's count of HUPs taken
    pid: int
    outcome: str  # REFUSED, STARTED, RELOADED or CANCELLED
    generation: int = 0
    changes: tuple[str, ...] = ()  # "workers: 2 -> 3", "bind: +udp://127.0.0.1:9000"
    held: tuple[str, ...] = ()  # "preload: ... (apply with: prefork upgrade)"
    error: str = ""
    exit_code: int = 0


def report_path(pidfile: str) -> str:
    return f"{pidfile}.reload"


def write_report(path: str, report: ReloadReport) -> None:
    """Replace the file at *path* with *report* (written beside it, then renamed)."""
    temp = f"{path}.{os.getpid()}.tmp"
    data = json.dumps(dataclasses.asdict(report), indent=1).encode()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)


def read_report(path: str) -> ReloadReport | None:
    """The report at *path*, or None when there is none (no reload yet) or it is not one."""
    try:
        with open(path, "rb") as file:
            data: Any = json.loads(file.read())
        fields = {f.name for f in dataclasses.fields(ReloadReport)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return ReloadReport(**values)
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # missing, half-written by another version, or junk: no report to go by
