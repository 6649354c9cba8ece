"""Hooks that append their name (and the pid that ran them) to the file named by $HOOK_LOG."""

from __future__ import annotations

import os


def _note(name: str) -> None:
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(f"{name} {os.getpid()}\n")


def on_starting(settings): _note("on_starting")
def pre_fork(arbiter, worker): _note("pre_fork")
def post_fork(worker): _note("post_fork")
def worker_exit(arbiter, worker): _note("worker_exit")
def on_exit(arbiter): _note("on_exit")
