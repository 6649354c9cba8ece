"""Load application objects named by 'module:attribute' strings. Runs in: both.

Used for the app (a handler class, a server class, a WSGI callable or a bundled service module)
and for hooks. Every failure is an AppLoadError that names the string, the module and the cause
in one line: the exception and where in the app's code it was raised (the file and line), not a
traceback through importlib.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import traceback
from typing import Any

from prefork.errors import AppLoadError

__all__ = ["load_object", "split_target", "locate"]


def split_target(target: str) -> tuple[str, str]:
    """'pkg.mod:attr.sub' -> ('pkg.mod', 'attr.sub'); a bare module name gives ('pkg.mod', '')."""
    module, _, attr = target.partition(":")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise AppLoadError(f"cannot load {target!r}: expected 'module' or 'module:attribute'")
    return module, attr


def load_object(target: str) -> Any:
    """Import the module of *target* and return the named attribute (or the module itself)."""
    module_name, attr = split_target(target)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) == module_name:
            raise AppLoadError(f"cannot load {target!r}: no module named {module_name!r}") from exc
        raise AppLoadError(f"cannot load {target!r}: importing {module_name!r} failed: {_cause(exc)}") from exc
    except Exception as exc:
        raise AppLoadError(f"cannot load {target!r}: importing {module_name!r} raised {_cause(exc)}") from exc
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"cannot load {target!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def locate(target: str) -> str | None:
    """The file (or package directory) that importing *target*'s module reads; None if not found.

    Found as importlib would find it, package by package, without running any code: so the
    master, or a worker before it drops privileges, can tell where the app is.
    """
    search: list[str] | None = None
    where: str | None = None
    parts = split_target(target)[0].split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        loaded = sys.modules.get(name)
        spec = (getattr(loaded, "__spec__", None) if loaded is not None
                else importlib.machinery.PathFinder.find_spec(name, search))
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
        where = spec.origin if spec.has_location else (search[0] if search else None)
    return where if where and os.path.isabs(where) else None


def _cause(exc: BaseException) -> str:
    """'Type: message (at FILE:LINE)' on one line: where the app's code failed."""
    if isinstance(exc, SyntaxError):  # where the code failed to compile, not where it was imported
        return f"{type(exc).__name__}: {exc.msg} (at {exc.filename}:{exc.lineno})"
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith("<frozen ") and frame.filename != __file__]
    return f"{text} (at {frames[-1].filename}:{frames[-1].lineno})" if frames else text
