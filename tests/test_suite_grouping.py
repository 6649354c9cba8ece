"""The suite's own scheduling, checked: tests.support.heavy keeps its tests on one xdist worker.

The heavy tests (a soak, a kill storm, locust, ...) load both cores on their own; the suite
runs on two xdist workers with ``--dist loadgroup``, and ``tests.support.heavy`` (an
``xdist_group``) is what keeps two of them from running at once. A pytest or pytest-xdist
release can stop honouring the group without any error (pytest 9.2 with pytest-xdist 3.8 did,
pytest-dev/pytest-xdist#1386); this test runs a small suite of its own on two workers and
fails when the grouped tests were spread over both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GROUPED = 6
UNGROUPED = 20

_SUITE = f'''
import os
import pytest
from pathlib import Path

OUT = Path(__file__).parent / "ran"

@pytest.mark.xdist_group("heavy")
@pytest.mark.parametrize("i", range({GROUPED}))
def test_grouped(i):
    (OUT / f"grouped-{{i}}").write_text(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range({UNGROUPED}))
def test_ungrouped(i):
    (OUT / f"ungrouped-{{i}}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_xdist_group_keeps_grouped_tests_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(_SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    ran = tmp_path / "ran"
    ran.mkdir()
    # -p no:locust: locust's pytest plugin imports gevent, seconds of start-up for nothing here.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:locust",
         "-n", "2", "--dist", "loadgroup", "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"),
         str(tmp_path / "test_inner.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    workers = {p.name: p.read_text() for p in ran.iterdir()}
    assert len(workers) == GROUPED + UNGROUPED, sorted(workers)
    grouped = {workers[f"grouped-{i}"] for i in range(GROUPED)}
    if len(set(workers.values())) < 2:
        pytest.fail(f"the inner suite ran on one xdist worker only ({workers}): nothing was checked")
    assert len(grouped) == 1, (
        f"tests of one xdist_group ran on {sorted(grouped)}: --dist loadgroup does not take effect with "
        "this pytest and pytest-xdist (see the pytest bound in pyproject.toml)")
