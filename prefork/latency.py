"""Request latency histograms: the fixed buckets and the one percentile definition. Runs in: both.

Rules:

1. The buckets are fixed for every worker and listener (LATENCY_BOUNDS, Prometheus's upper
   bounds ``le``, plus one bucket for the rest, ``+Inf``), so a worker counts a request with
   one bisection and two stores into the scoreboard, and readers add histograms bucket by bucket.
2. Counts are kept per bucket (not cumulative); ``cumulative`` gives Prometheus's ``_bucket``.
3. One percentile definition, the one of Prometheus's ``histogram_quantile``: find the bucket
   holding the rank ``q * count``, interpolate linearly between its lower and upper bound (the
   first bucket starts at 0); a rank in the ``+Inf`` bucket answers the highest finite bound.
   So ``prefork status``, ``prefork top`` and a dashboard over the metrics give the same p99.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

__all__ = ["LATENCY_BOUNDS", "BUCKETS", "Histogram", "from_counts"]

# Upper bounds in seconds, from 0.5 ms (a loopback echo) to 10 s (past any sane request; the
# +Inf bucket counts the rest). Prometheus's 1-2.5-5 steps: 14 bounds keep a slot small.
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Counts per histogram: one per bound, and +Inf.
BUCKETS = len(LATENCY_BOUNDS) + 1


@dataclasses.dataclass(frozen=True)
class Histogram:
    """One latency histogram: requests per bucket (not cumulative) and the sum of their seconds."""

    counts: tuple[int, ...] = (0,) * BUCKETS
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(tuple(a + b for a, b in zip(self.counts, other.counts)), self.total + other.total)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (le, requests at most that long), ending with ('+Inf', count)."""
        running, rows = 0, []
        for bound, count in zip((*map(_le, LATENCY_BOUNDS), "+Inf"), self.counts):
            running += count
            rows.append((bound, running))
        return rows

    def quantile(self, q: float) -> float | None:
        """The *q* quantile in seconds (rule 3); None without requests."""
        count = self.count
        if not count:
            return None
        rank, below = q * count, 0
        for index, in_bucket in enumerate(self.counts):
            if in_bucket and below + in_bucket >= rank:
                if index == len(LATENCY_BOUNDS):
                    return LATENCY_BOUNDS[-1]
                lower = LATENCY_BOUNDS[index - 1] if index else 0.0
                return lower + (LATENCY_BOUNDS[index] - lower) * (rank - below) / in_bucket
            below += in_bucket
        return LATENCY_BOUNDS[-1]  # not reached: the last bucket with requests holds the rank

    def summary(self) -> dict[str, float | int | None]:
        """count, sum, p50 and p99 (seconds, rounded to the microsecond) for status and top."""
        return {"count": self.count, "sum": round(self.total, 6), "p50": _rounded(self.quantile(0.5)),
                "p99": _rounded(self.quantile(0.99))}


def from_counts(counts: Sequence[int], total: float) -> Histogram:
    """A Histogram of counts read from the scoreboard (a ctypes array slice)."""
    return Histogram(tuple(int(c) for c in counts), float(total))


def _le(bound: float) -> str:
    return repr(bound)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
