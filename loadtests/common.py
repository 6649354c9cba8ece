"""Pieces the benchmark scripts share. Runs in: bench."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time

import psutil

__all__ = ["positive", "process_group_gone", "stop_process_group"]

# How often stop_process_group looks whether the group has gone.
_GROUP_POLL = 0.02


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def process_group_gone(pgid: int) -> bool:
    """True when no live (non-zombie) process is left in process group *pgid*."""
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return False
    return True


def stop_process_group(pgid: int, grace: float = 5.0) -> None:
    """TERM, then KILL after *grace* seconds, every process of group *pgid* (a session leader's pid)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if process_group_gone(pgid):
                return
            time.sleep(_GROUP_POLL)
