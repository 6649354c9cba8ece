"""`prefork top`: a live view of a running master, refreshed every second. Runs in: cli.

Rules:

1. The master is found as ``prefork status`` finds it (``control.Master``); top reads only the
   scoreboard file and /proc, and sends no signal.
2. What is shown is measured between two readings one REFRESH apart: a worker's requests per
   second is the growth of its count over that interval (shown as "-" for a worker seen once),
   its CPU % the growth of its CPU time. Latency percentiles are prefork.latency's definition,
   over every request since the master started, as ``prefork status`` gives them.
3. On a terminal, a curses screen: keys sort the rows (``SORT_KEYS``), ``q`` quits. Curses and
   not rich: top needs keys read with a timeout as much as drawing, curses (stdlib) does both in
   a few calls and adds no dependency, where rich draws but reads no keys. Any other stdout (a
   pipe, a file) gets the same frame as plain text once per interval, ``--iterations`` times.
"""

from __future__ import annotations

import argparse
import curses
import dataclasses
import sys
import time
from typing import Any, Callable

from prefork.control import Master, columns, duration_text, millis_text, percent_text, size_text
from prefork.procstats import CpuSampler, stats
from prefork.scoreboard import AGED_STATES, BUSY, IDLE, NO_DEPTH, SlotView

__all__ = ["cmd_top", "Watch", "Row", "SORT_KEYS", "render"]

# Seconds between two frames: top(1)'s default is 3, prefork's own tick is 1 s.
REFRESH = 1.0

# Key -> (what the footer says, the sort key of a row); the rows sort descending but by number.
SORT_KEYS: dict[str, tuple[str, Callable[[Row], Any]]] = {
    "n": ("number", lambda row: row.number),
    "r": ("req/s", lambda row: -(row.rate or 0.0)),
    "a": ("age", lambda row: -row.age),
    "c": ("cpu", lambda row: -(row.cpu or 0.0)),
    "m": ("rss", lambda row: -(row.rss or 0)),
}
_HEADINGS = ("#", "PID", "GEN", "STATE", "REQ/S", "REQUESTS", "AGE", "CLIENT", "RSS", "USS", "CPU")


@dataclasses.dataclass(frozen=True)
class Row:
    """One worker as top shows it."""

    number: int
    pid: int
    generation: int
    state: str
    requests: int
    rate: float | None  # requests per second over the last interval; None: first seen
    age: float  # seconds on the current request, or since a stalled loop last turned; 0 when idle
    client: str
    rss: int | None
    uss: int | None
    cpu: float | None

    def cells(self) -> tuple[str, ...]:
        busy = self.state in AGED_STATES
        return (str(self.number), str(self.pid), str(self.generation), self.state,
                "-" if self.rate is None else f"{self.rate:.1f}", str(self.requests),
                duration_text(self.age) if busy else "-", self.client if busy else "", size_text(self.rss),
                size_text(self.uss), percent_text(self.cpu))


@dataclasses.dataclass(frozen=True)
class Frame:
    """One reading: the master's lines and the workers' rows."""

    head: list[str]
    rows: list[Row]


class Watch:
    """Takes frames of one master, keeping what the next frame's rates need."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self._cpu = CpuSampler()
        self._seen: dict[int, tuple[int, float]] = {}  # pid -> (requests, when read)

    def frame(self) -> Frame:
        view, slots, latency = self.master.reading("watching it")
        now = time.monotonic()
        rows = [self._row(slot, now) for slot in slots if slot.pid]
        self._seen = {row.pid: (row.requests, now) for row in rows}
        serving = sum(1 for slot in slots if slot.pid and slot.state in (IDLE, BUSY))
        restarts = ", ".join(f"{cause} {count}" for cause, count in view.restarts.items())
        head = [f"master {view.pid}  generation {view.generation}  workers {serving} serving of "
                f"{view.target} target ({len(slots)} running)  up {duration_text(now - view.started)}",
                f"restarts: {restarts}"]
        for i, (name, depth) in enumerate(zip(view.listeners, view.queue_depth)):
            summary = latency[i].summary()
            head.append(f"{name}: queue {'-' if depth == NO_DEPTH else depth}  {summary['count']} requests  "
                        f"p50 {millis_text(summary['p50'])}  p99 {millis_text(summary['p99'])}")
        return Frame(head, rows)

    def _row(self, slot: SlotView, now: float) -> Row:
        pid = slot.pid
        reading = stats(pid, with_uss=True, sampler=self._cpu)
        before = self._seen.get(pid)
        rate = (slot.requests - before[0]) / (now - before[1]) if before and now > before[1] else None
        return Row(slot.number, pid, slot.generation, slot.shown_state(now), slot.requests, rate, slot.shown_age(now),
                   slot.client, reading.rss if reading else None, reading.uss if reading else None,
                   reading.cpu_percent if reading else None)


def render(frame: Frame, sort: str) -> list[str]:
    """The frame as lines of text, the rows sorted by SORT_KEYS[*sort*]."""
    name, key = SORT_KEYS[sort]
    rows = sorted(frame.rows, key=lambda row: (key(row), row.number))
    keys = "  ".join(f"{k} {label}" for k, (label, _) in SORT_KEYS.items())
    return [*frame.head, f"sorted by {name} (keys: {keys}, q quit)", "",
            *columns([_HEADINGS, *(row.cells() for row in rows)]).splitlines()]


def cmd_top(args: argparse.Namespace) -> int:
    watch = Watch(Master.find(args))
    watch.master.published()
    if sys.stdout.isatty() and not args.iterations:
        curses.wrapper(_screen, watch, args.sort)
    else:
        _plain(watch, args.sort, args.iterations)
    return 0


def _plain(watch: Watch, sort: str, iterations: int) -> None:
    """A frame per interval on stdout; the first after one interval, so that rates have one."""
    watch.frame()
    count = 0
    while not iterations or count < iterations:
        time.sleep(REFRESH)  # the measuring interval, not a wait for something to happen
        print("\n".join(render(watch.frame(), sort)) + "\n", flush=True)
        count += 1


def _screen(screen: Any, watch: Watch, sort: str) -> None:
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal without an invisible cursor: the cursor shows, nothing else changes
    frame, due = watch.frame(), time.monotonic() + REFRESH
    while True:
        _draw(screen, render(frame, sort))
        screen.timeout(max(0, int((due - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if 0 <= key < 256 and chr(key) in SORT_KEYS:
            sort = chr(key)
        if time.monotonic() >= due:
            frame, due = watch.frame(), time.monotonic() + REFRESH


def _draw(screen: Any, lines: list[str]) -> None:
    height, width = screen.getmaxyx()
    screen.erase()
    for y, line in enumerate(lines[:height]):
        attribute = curses.A_REVERSE if line.startswith("#  ") else curses.A_NORMAL
        screen.addnstr(y, 0, line, max(0, width - 1), attribute)
    screen.refresh()
