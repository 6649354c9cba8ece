"""docs/reliability.md names the test behind each promise: every name it gives must exist."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
# `test_faults.py::test_name[param]`, `tests/test_listeners.py::test_name`, or `::test_name`
# (same file as the reference before it); a trailing … abbreviates the name.
REFERENCE = re.compile(r"`(?:(?:tests/)?([\w/]*test_\w+\.py))?::(\w+)(…)?(?:\[[^\]]*\])?`")


@functools.cache  # each file once: the document names hundreds of tests in a few files
def defined_tests(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(node.name for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"))


def resolve(name: str) -> Path:
    for candidate in (ROOT / "tests" / name, ROOT / "tests" / "reliability" / name):
        if candidate.exists():
            return candidate
    raise AssertionError(f"docs/reliability.md names {name}, which is not in tests/ or tests/reliability/")


def test_every_test_the_document_names_exists():
    current, missing, seen = None, [], 0
    for match in REFERENCE.finditer(DOC.read_text()):
        file_name, name, abbreviated = match.groups()
        current = resolve(file_name) if file_name else current
        assert current is not None, f"{match.group(0)} names no file"
        names = defined_tests(current)
        found = any(n.startswith(name) for n in names) if abbreviated else name in names
        if not found:
            missing.append(f"{current.name}::{name}")
        seen += 1
    assert seen >= 40, f"only {seen} references found: has the document's form changed?"
    assert not missing, missing
