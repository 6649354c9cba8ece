"""The reliability suite: faults under load, bad input and privileges (docs/reliability.md).

Every module here marks its tests ``reliability`` (``pytest -m reliability`` runs only them);
the masters, loads and teardown are the integration suite's.
"""

from __future__ import annotations

from tests.integration.conftest import Load, Master, load, open_dir, open_dirs, readable_app, start_master

__all__ = ["Load", "Master", "load", "open_dir", "open_dirs", "readable_app", "start_master"]
