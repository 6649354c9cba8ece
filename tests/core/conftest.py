"""Fixtures of the compatible core's tests: high descriptor numbers (sock_dir is in tests/conftest.py)."""

from __future__ import annotations

import os
import resource
from typing import Iterator

import pytest

# select.select() cannot watch descriptors at or above FD_SETSIZE (1024 on Linux); a busy
# worker easily has descriptor numbers that high.
_FD_SETSIZE = 1024


@pytest.fixture
def high_fds() -> Iterator[None]:
    """Occupy descriptor numbers up to past FD_SETSIZE, so the next ones opened are higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _FD_SETSIZE + 128
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip("RLIMIT_NOFILE hard limit %d is below %d" % (hard, wanted))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < _FD_SETSIZE:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
