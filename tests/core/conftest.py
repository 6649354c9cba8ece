"""Fixtures of the compatible core's tests: short Unix socket paths, high descriptor numbers."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

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
