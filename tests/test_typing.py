"""The package ships py.typed, so its types must hold: mypy --strict over prefork and workers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_strict_passes():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "prefork", "workers"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_py_typed_is_shipped():
    assert (ROOT / "prefork" / "py.typed").exists()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()
