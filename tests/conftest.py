"""Shared fixtures: every test is checked for leaked child processes and threads."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings as hypothesis_settings

from tests.support import Certs, wait_until

# How long a test's children and threads get to finish after the test body returns.
_LEAK_GRACE = 5.0

# Property tests draw the same examples on every run, so that CI is reproducible and a red run
# can be replayed. A wider random search: `pytest --hypothesis-profile=explore -m reliability`.
# Neither times an example (hypothesis' default: 200 ms, and a health check on slow data): they
# check what the code does, and on a shared, busy machine (CI's two cores run two pytest workers)
# a fast example can take longer; a hang is still ended by pytest-timeout.
_UNTIMED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
hypothesis_settings.register_profile("reproducible", derandomize=True, database=None, **_UNTIMED)
hypothesis_settings.register_profile("explore", max_examples=1000, **_UNTIMED)
hypothesis_settings.load_profile("reproducible")  # --hypothesis-profile, if given, wins


def _live_children() -> set[psutil.Process]:
    return {p for p in psutil.Process().children(recursive=True) if _alive(p)}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves a child process or a thread behind (and clean them up)."""
    threads_before = set(threading.enumerate())
    children_before = _live_children()
    yield
    new_threads = lambda: [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    new_children = lambda: [p for p in _live_children() if p not in children_before]
    wait_until(lambda: not new_threads() and not new_children(), timeout=_LEAK_GRACE, fail=False)
    leaked_children = new_children()
    for proc in leaked_children:
        try:
            proc.kill()
            proc.wait(timeout=5)
        except psutil.Error:
            pass
    _reap_zombies()
    leaked_threads = new_threads()
    assert not leaked_children, f"test leaked child processes: {leaked_children}"
    assert not leaked_threads, f"test leaked threads: {leaked_threads}"


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture(autouse=True, scope="session")
def _default_sigpipe():
    """Tests write to sockets whose peer is gone; make that an exception, never a kill."""
    previous = signal.getsignal(signal.SIGPIPE)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, previous)


# AF_UNIX paths are limited to 107 bytes on Linux (108 with the NUL). Leave room for the
# socket's own file name under the directory.
_MAX_UNIX_DIR = 80


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose paths are short enough to bind Unix sockets in."""
    if len(str(tmp_path)) <= _MAX_UNIX_DIR:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and certificates made now with trustme (tests.support.Certs): no key material in the repository."""
    return Certs(tmp_path_factory.mktemp("certs"))
