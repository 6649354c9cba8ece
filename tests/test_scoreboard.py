"""The scoreboard file as readers (`prefork status`, the metrics process) find it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefork import scoreboard
from prefork.scoreboard import Scoreboard


def test_the_file_has_its_header_before_it_has_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that opens the file the moment it appears must find a whole scoreboard, not zeros."""
    seen = []
    replace = os.replace

    def check_then_replace(source: str, target: str) -> None:
        Scoreboard.open(source).close()  # raises ValueError for a blank header
        seen.append(target)
        replace(source, target)

    monkeypatch.setattr(scoreboard.os, "replace", check_then_replace)
    board = Scoreboard.create(4, str(tmp_path / "board"))
    try:
        assert seen == [str(tmp_path / "board")]
        assert Scoreboard.open(str(tmp_path / "board")).master().pid == os.getpid()
    finally:
        board.close()
