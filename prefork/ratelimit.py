"""At most one log line per interval, with a count of the reports held back. Runs in: both.

The one shape of prefork's rate-limited reports, each a few lines of its own wording on top:
an out-of-resources accept() in the core's servers (``prefork.servers``), a client refused by
an allow-list (``prefork.allowlist``), connections a parking lot or an event loop's stages
closed (``prefork.parking.Report``), an event loop out of descriptors (``prefork.aioworker``).
A misbehaving client or an exhausted resource costs one line per interval, never a flood, and
the next line says how many were not logged.

Part of the core: it imports nothing of prefork, so ``prefork.servers`` may use it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

__all__ = ["RateLimit"]


class RateLimit:
    """One report in *interval* seconds of *clock* may be logged; the others are counted.

    Not locked: a caller whose reports come from several threads holds its own lock.
    """

    __slots__ = ("interval", "clock", "next_line", "held")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.next_line = -math.inf
        self.held = 0

    def allow(self) -> int | None:
        """A report: if its line may be logged now, how many reports were held back since the
        last line; else None (and this one is counted as held back)."""
        now = self.clock()
        if now < self.next_line:
            self.held += 1
            return None
        self.next_line = now + self.interval
        held, self.held = self.held, 0
        return held
