"""Hooks that fail on purpose (each raises RuntimeError naming itself), and one that notes its
call in ./hooks.txt (the master's working directory), for the tests of hook failures."""

from __future__ import annotations

import os
from typing import Any


def _fail(name: str) -> None:
    raise RuntimeError(f"{name} failed on purpose")


def on_starting(settings: Any) -> None: _fail("on_starting")
def when_ready(arbiter: Any) -> None: _fail("when_ready")
def pre_fork(arbiter: Any, worker: Any) -> None: _fail("pre_fork")
def worker_exit(arbiter: Any, worker: Any) -> None: _fail("worker_exit")
def on_exit(arbiter: Any) -> None: _fail("on_exit")


def post_fork(worker: Any) -> None:
    """Fails while ./post_fork.fail exists (the test removes it to let workers start)."""
    if os.path.exists("post_fork.fail"):
        _fail("post_fork")


def note_pre_fork(arbiter: Any, worker: Any) -> None:
    with open("hooks.txt", "a") as file:
        file.write(f"pre_fork {worker.generation}\n")
