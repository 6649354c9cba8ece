"""The service and hooks of the soak tests (test_soak.py). Runs in: worker (imported by each).

The integration suite's command handler (tests/integration/apps.py), plus:

- ``leak N``: keep N more bytes in this worker for good; the reply is ``PID TOTAL``, so the
  test knows which worker holds how much;
- ``slow``: echoed after SLOW_REQUEST seconds of work, so requests are in flight when signals
  arrive (and a load's request rate does not depend on how fast the machine is);
- ``low_nofile``, a post_fork hook that leaves the worker few file descriptors.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

from prefork.handlers import StreamRequestHandler
from tests.integration import apps

# The worker's soft RLIMIT_NOFILE under ``low_nofile``: room for what a worker holds at boot
# (about 15 descriptors) and a few dozen connections, far fewer than the test keeps open.
LOW_NOFILE = 64


# How long a ``slow`` request takes.
SLOW_REQUEST = 0.002


def low_nofile(worker: Any) -> None:
    """post_fork hook: run this worker with a soft limit of LOW_NOFILE descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_NOFILE, hard))


def answer(command: bytes) -> bytes:
    verb, _, arg = command.partition(b" ")
    if verb == b"slow":
        time.sleep(SLOW_REQUEST)
        return command
    if verb == b"leak":
        total = apps.answer(b"grow " + arg)
        return b"%d %s" % (os.getpid(), total)
    return apps.answer(command)


class StreamHandler(StreamRequestHandler):
    """Answers each line until the client closes."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(answer(line.rstrip(b"\n")) + b"\n")
