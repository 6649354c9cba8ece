"""The app of the fault tests: the integration app's commands, plus handlers that misbehave.

Commands added to those of tests.integration.apps (one per line, answered on the same line):

- ``spin S``: keep the CPU busy in Python code for S seconds.
- ``announce COMMAND``: first reply ``started``, then run COMMAND and reply as it does, so a
  client knows the command is running (not merely that its connection was accepted).
- ``block``: never return (sleeps for ever): only the master's ``timeout`` ends it.
- ``block-masked``: block SIGABRT in this thread, then never return, as code stuck in C with
  signals blocked would: the timeout's SIGABRT cannot work and only SIGKILL ends it.

``no_pdeathsig`` is a post_fork hook that clears PR_SET_PDEATHSIG again, leaving the worker's own
parent check as the only way it learns that the master died.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time
from typing import Any

from prefork.handlers import StreamRequestHandler
from tests.integration.apps import answer as common_answer

# prctl(2) option: the signal the kernel sends a process when its parent dies (0: none).
_PR_SET_PDEATHSIG = 1
# A "block" handler sleeps in steps this long, for ever.
_BLOCK_STEP = 60.0


def answer(command: bytes) -> bytes:
    verb, _, arg = command.partition(b" ")
    if verb == b"spin":
        deadline = time.monotonic() + float(arg)
        while time.monotonic() < deadline:
            pass
        return b"spun"
    if verb == b"block-masked":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT})
        verb = b"block"
    if verb == b"block":
        while True:
            time.sleep(_BLOCK_STEP)
    return common_answer(command)


class StreamHandler(StreamRequestHandler):
    """Answers each line until the client closes."""

    def handle(self) -> None:
        for line in self.rfile:
            command = line.rstrip(b"\n")
            if command.startswith(b"announce "):
                command = command.removeprefix(b"announce ")
                self.wfile.write(b"started\n")
            self.wfile.write(answer(command) + b"\n")


def no_pdeathsig(worker: Any) -> None:
    """post_fork hook: undo PR_SET_PDEATHSIG, so only the worker's parent check is left."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
