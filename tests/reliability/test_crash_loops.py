"""Crash loops end, and each hook's failure does what the README says (README "Supervision").

Masters run from the CLI, as an operator runs them; each test bounds its time.
"""

from __future__ import annotations

import signal
import time

import pytest

from prefork.errors import EXIT_APP_LOAD, EXIT_OK
from prefork.pool import Pool, Spawn
from tests.integration.test_cli import cli_master, prefork, tcp_line  # noqa: F401 (a fixture)
from tests.support import pool_config, wait_until

pytestmark = pytest.mark.reliability

HOOKS = "tests.reliability.hooks_fail"
# Few attempts, so that a test sees the halt within a second of back-off (0.1 + 0.2 + 0.4 s).
LIMIT = "4"


@pytest.mark.parametrize("hook", ["when_ready", "pre_fork", "worker_exit", "on_exit"])
def test_an_observing_hook_that_raises_is_logged_with_its_traceback_and_the_master_goes_on(cli_master, hook):
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0",
                        f"--{hook.replace('_', '-')}", f"{HOOKS}:{hook}", workers=2)
    wait_until(lambda: "ready:" in master.log(), message=master.log())
    pid = master.workers()[0].pid
    master.proc.send_signal(signal.SIGHUP)  # forks (pre_fork) and reaps (worker_exit) again
    wait_until(lambda: pid not in {w.pid for w in master.workers()}, message=master.log())
    assert tcp_line(master.listening()["tcp"][0], b"served") == b"served"
    master.proc.send_signal(signal.SIGTERM)
    assert master.wait_exit() == EXIT_OK, master.log()
    log = master.log()
    assert f"hook {hook} failed" in log and "Traceback" in log and f"RuntimeError: {hook} failed on purpose" in log


def test_a_failing_on_starting_stops_the_start_with_exit_3_naming_it(cli_master):
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0", "--on-starting",
                        f"{HOOKS}:on_starting", workers=None)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "prefork: error: hook on_starting failed: RuntimeError('on_starting failed on purpose')" in master.log()
    assert not master.workers()


def test_workers_failing_in_post_fork_end_in_a_halt_naming_the_cause(cli_master, tmp_path):
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "post_fork.fail").touch()  # the hook fails while this file exists
    started = time.monotonic()
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0", "--crash-limit", LIMIT,
                        "--post-fork", f"{HOOKS}:post_fork", workers=None)
    assert master.wait_exit() == EXIT_APP_LOAD, master.log()
    took = time.monotonic() - started
    last = master.log().strip().splitlines()[-1]
    assert "exiting: crash loop: 4 workers in a row died before serving" in last, master.log()
    assert "post_fork hook failed: RuntimeError('post_fork failed on purpose')" in last
    assert master.log().count("Traceback") >= 4, "each failure is logged with its traceback"
    assert took < 20, f"a crash loop of {LIMIT} attempts took {took:.1f}s"


CRASHES = {
    "exit": ("import os\nos._exit(7)\n", "exit status 7"),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "killed by SIGSEGV"),
    "oom-kill": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by SIGKILL"),
}


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_workers_dying_at_import_end_in_a_halt_naming_how(cli_master, tmp_path, crash):
    source, how = CRASHES[crash]
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "crashing.py").write_text(source)
    master = cli_master("crashing", "--bind", "tcp://127.0.0.1:0", "--crash-limit", LIMIT, workers=None)
    assert master.wait_exit() == EXIT_APP_LOAD, master.log()
    last = master.log().strip().splitlines()[-1]
    assert "crash loop: 4 workers in a row died before serving" in last and how in last, master.log()


def test_crash_timeout_halts_a_slow_crash_loop():
    """Policy: the streak's age halts it too (crash_limit 0: attempts alone never would)."""
    pool = Pool(pool_config(crash_limit=0, crash_timeout=10.0), capacity=4)
    now, pid = 0.0, 100
    actions = pool.start(now)
    while not pool.stopping and now < 1000:
        spawns = [action for action in actions if isinstance(action, Spawn)]
        if spawns:
            pid += 1
            pool.spawned(spawns[0].worker, pid)
            actions = pool.exited(pid, 1, now + 0.01, cause="exit status 1")
        else:
            now += 0.5  # the back-off: the next worker is started on a later tick
            actions = pool.tick(now, {})
    assert pool.stopping and pool.exit_code == EXIT_APP_LOAD
    assert 10.0 <= now < 40.0 and "crash loop" in pool.exit_reason and "exit status 1" in pool.exit_reason
