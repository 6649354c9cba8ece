"""The scoreboard file as readers (`prefork status`, the metrics process) find it."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import pytest

from prefork import scoreboard
from prefork.latency import BUCKETS, LATENCY_BOUNDS, Histogram
from prefork.scoreboard import MAX_LISTENERS, Scoreboard, Tally


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


def test_a_scoreboard_of_another_version_is_named_as_such(tmp_path: Path) -> None:
    """`prefork status` of an older master: the layout differs, and the message says so."""
    board = Scoreboard.create(2, str(tmp_path / "board"))
    board.close()
    path = tmp_path / "old"
    path.write_bytes(b"PFSB0002" + bytes(4096))
    with pytest.raises(ValueError, match="written by another version of prefork .layout PFSB0002"):
        Scoreboard.open(str(path))
    path.write_bytes(b"NOTABOARD" + bytes(4096))
    with pytest.raises(ValueError, match="is not a prefork scoreboard"):
        Scoreboard.open(str(path))


def test_an_event_loops_slot_says_so_until_its_loop_ends_and_reads_its_stall() -> None:
    board = Scoreboard.create(1)
    try:
        board.claim(0, 1, 1)
        writer = board.writer(0)
        writer.booted(1234)
        assert not board.read(0).event_loop and board.read(0).loop_stalled(1e9) == 0.0  # a synchronous worker's
        writer.event_loop(True)
        writer.turned(False)
        view = board.read(0)
        assert view.event_loop and view.state == scoreboard.IDLE
        assert view.loop_stalled(view.last_tick + 7.5) == 7.5
        writer.event_loop(False)
        assert not board.read(0).event_loop
        writer.event_loop(True)
        del writer  # its views of the map would keep close() from unmapping it
        board.release(0)
        board.claim(0, 1, 2)
        assert not board.read(0).event_loop  # the next worker of the slot starts as no loop's
    finally:
        board.close()


def test_latency_counts_survive_the_release_of_a_slot(tmp_path: Path) -> None:
    board = Scoreboard.create(2)
    try:
        board.claim(0, 1, 1)
        board.claim(1, 2, 1)
        board.writer(0).observe(0, 0.004)
        board.writer(1).observe(0, 0.0001)
        board.writer(1).observe(9, 1.0)  # past the last counter: counted under it
        assert board.slot_latency(0)[0].count == 1
        board.release(0)
        board.claim(0, 1, 2)
        assert board.slot_latency(0)[0].count == 0  # the successor starts from zero
        tcp, last = board.latency()[0], board.latency()[-1]
        assert tcp.count == 2 and tcp.total == pytest.approx(0.0041) and last.count == 1
    finally:
        board.close()


def test_percentiles_interpolate_within_the_bucket() -> None:
    """histogram_quantile's definition: linear between the bucket's bounds, the +Inf bucket its lower bound."""
    counts = [0] * BUCKETS
    counts[2] = 10  # (1 ms, 2.5 ms]
    histogram = Histogram(tuple(counts), 0.02)
    assert histogram.quantile(0.5) == pytest.approx(0.00175)
    assert histogram.quantile(1.0) == pytest.approx(0.0025)
    counts[0], counts[-1] = 10, 1
    assert Histogram(tuple(counts)).quantile(0.25) == pytest.approx(0.0005 * (0.25 * 21) / 10)  # rank 5.25 of 10
    assert Histogram(tuple(counts)).quantile(0.99) == LATENCY_BOUNDS[-1]
    assert Histogram().quantile(0.5) is None
    assert [le for le, _ in Histogram(tuple(counts)).cumulative()][-2:] == ["10.0", "+Inf"]


def test_a_tally_adds_requests_per_listener_and_their_latency_to_the_slot() -> None:
    """An event loop counts requests in a Tally and adds it on its tick: the slot's counts and
    histograms as if written one by one, and the tally empty for the next tick."""
    board = Scoreboard.create(1)
    try:
        board.claim(0, 1, 1)
        writer, tally = board.writer(0), Tally()
        for index, seconds in ((1, 0.003), (1, 0.0001), (MAX_LISTENERS - 1, 2.0)):
            tally.served[index] += 1
            tally.counts[index * BUCKETS + bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
            tally.sums[index] += seconds
        writer.add_tally(tally)
        writer.add_tally(tally)  # emptied by the first: adds nothing
        view = board.read(0)
        assert view.requests == 3 and view.by_listener[1] == 2 and view.by_listener[-1] == 1
        histograms = board.slot_latency(0)
        assert (histograms[1].count, histograms[-1].count) == (2, 1)
        assert histograms[1].total == pytest.approx(0.0031)
        assert tally.served == [0] * MAX_LISTENERS and not any(tally.counts) and not any(tally.sums)
        del writer
    finally:
        board.close()


def test_observe_allocates_nothing_that_outlives_the_call() -> None:
    """A request's record is a few stores into the map: no memory grows with the requests.

    (Its cost in time is measured by the master benchmark, `python -m loadtests.bench master`.)
    """
    import tracemalloc

    board = Scoreboard.create(1)
    try:
        board.claim(0, 1, 1)
        writer = board.writer(0)
        writer.observe(1, 0.003)  # warm: bisect's first call, the int caches
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(10_000):
                writer.observe(i % 3, 0.0001 * (i % 50))
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 4096, f"{grown} bytes more after 10,000 requests"
        del writer
    finally:
        board.close()
