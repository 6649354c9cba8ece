"""prefork.ratelimit: one line per interval, and the count of what was held back."""

from __future__ import annotations

from prefork.ratelimit import RateLimit


def test_the_first_report_is_logged_the_next_ones_held_until_the_interval_ends() -> None:
    now = [1000.0]
    limit = RateLimit(5.0, lambda: now[0])
    assert limit.allow() == 0  # the first: logged, nothing held before it
    assert [limit.allow() for _ in range(3)] == [None, None, None]
    now[0] += 4.999
    assert limit.allow() is None
    now[0] += 0.001
    assert limit.allow() == 4  # logged, with the four held back since the last line
    assert limit.allow() is None


def test_after_a_quiet_interval_the_next_report_is_logged_with_nothing_held() -> None:
    now = [1000.0]
    limit = RateLimit(5.0, lambda: now[0])
    assert limit.allow() == 0
    now[0] += 60
    assert limit.allow() == 0


def test_a_clock_that_starts_at_zero_logs_the_first_report() -> None:
    # A fake clock, or a monotonic clock early in a VM's life.
    assert RateLimit(5.0, lambda: 0.0).allow() == 0
