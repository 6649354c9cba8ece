"""A TERM that reaches a worker right after fork is honoured (README "Signals").

The master forks a successor for HUP and, when a TERM was pending with it (the kernel hands
over the lower signal number first: HUP, then TERM), asks that new worker to stop microseconds
later: before the child has replaced the master's signal handlers. Such a
TERM must not be lost (it used to be: the worker then left only at graceful_timeout's SIGKILL).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from prefork.errors import EXIT_OK
from tests.support import heavy

# heavy: forty masters in a row, and the race wants a master that gets a CPU when it asks.
pytestmark = [pytest.mark.reliability, heavy]

# Rounds of HUP+TERM, each against a fresh master: the race window is a fraction of a
# millisecond, so several rounds give it many chances to show.
ROUNDS = 40
# A stop that had to wait for the SIGKILL takes graceful_timeout; a prompt one well under it.
GRACEFUL_TIMEOUT = 8.0
PROMPT = 5.0


def test_a_term_sent_to_a_worker_just_forked_is_honoured(start_master):
    slow = []
    for _ in range(ROUNDS):
        master = start_master(workers=4, graceful_timeout=GRACEFUL_TIMEOUT)
        # On one CPU the master runs on after fork (Linux does not run the child first), so the
        # TERM is sent before the new child has run at all: the window, every time.
        os.sched_setaffinity(master.pid, {min(os.sched_getaffinity(0))})
        started = time.monotonic()
        # Both pending when the master runs again: it forks for HUP, then stops every worker
        # for TERM, the new one included, right after its fork.
        master.signal(signal.SIGSTOP)
        master.signal(signal.SIGHUP)
        master.signal(signal.SIGTERM)
        master.signal(signal.SIGCONT)
        code = master.wait_exit(GRACEFUL_TIMEOUT + 10)
        took = time.monotonic() - started
        assert code == EXIT_OK, master.log()
        if took > PROMPT or "still running" in master.log():
            slow.append((round(took, 1), master.log()[-2000:]))
    assert not slow, f"{len(slow)} of {ROUNDS} stops waited for SIGKILL; first: {slow[0]}"
