"""Fixtures of the compatible core's tests: short directories for Unix socket paths."""

from __future__ import annotations

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
