"""Process titles, so ``ps`` and ``top`` tell the master and each worker apart. Runs in: both.

Titles look like ``prefork: master [echo]`` and ``prefork: worker 3 [echo] gen 2``: the role,
the worker's number, the service's name in brackets, and the generation (bumped by each
reload). ``setproctitle`` is optional at run time: without it titles are silently not set.
"""

from __future__ import annotations

import logging
from types import ModuleType

__all__ = ["title_for", "set_title", "available"]

log = logging.getLogger("prefork.proctitle")

_setproctitle: ModuleType | None
try:
    import setproctitle as _setproctitle
except ImportError:  # a convenience, never a reason not to start: titles just stay as they are
    _setproctitle = None

# Every title starts with this, so `pgrep -f '^prefork: '` finds the whole service.
PREFIX = "prefork:"


def title_for(role: str, name: str, number: int | None = None, generation: int | None = None) -> str:
    """The title for a process of *role* (``master``, ``worker``) serving *name*."""
    parts = [PREFIX, role]
    if number is not None:
        parts.append(str(number))
    parts.append(f"[{_one_line(name)}]")
    if generation is not None:
        parts.append(f"gen {generation}")
    return " ".join(parts)


def set_title(role: str, name: str, number: int | None = None, generation: int | None = None) -> bool:
    """Set this process's title (see ``title_for``); False if setproctitle is not installed."""
    title = title_for(role, name, number, generation)
    if _setproctitle is None:
        log.debug("setproctitle is not installed; not setting the title %r", title)
        return False
    _setproctitle.setproctitle(title)
    return True


def available() -> bool:
    """True if titles can be set (setproctitle imported)."""
    return _setproctitle is not None


def _one_line(text: str) -> str:
    # A newline or NUL in a title would garble ps output (NUL ends the title outright).
    return " ".join(text.replace("\0", " ").split())
