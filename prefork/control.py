"""Inspecting and controlling a running master: `prefork status` and the control commands. Runs in: cli.

Rules: the master is found by its pidfile; each command sends one signal at a time and waits,
with a deadline, until the pidfile and the scoreboard (``PIDFILE.scoreboard``) show that it
took effect, because two signals of one kind sent together would merge into one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Sequence

import psutil

from prefork import config, runpaths
from prefork.errors import EXIT_FAILURE, EXIT_NOT_APPLIED, EXIT_OK, EXIT_UNHEALTHY, ConfigError, PidfileError, PreforkError
from prefork.pidfile import is_running, read_pid
from prefork.procstats import CpuSampler, ProcStats, stats
from prefork.reloads import CANCELLED, REFUSED, RELOADED, ReloadReport, read_report, report_path
from prefork.latency import Histogram
from prefork.scoreboard import AGED_STATES, BUSY, IDLE, NO_DEPTH, MasterView, Scoreboard, SlotView

__all__ = ["Master", "cmd_status", "cmd_reload", "cmd_stop", "cmd_upgrade", "cmd_scale", "cmd_reopen_logs",
           "DEFAULT_WAIT", "columns", "listener_rows",
           "size_text", "percent_text", "duration_text", "millis_text"]

# How long a control command waits for its effect unless --timeout says otherwise: more than
# the default graceful_timeout (30 s), so that `prefork stop` sees a graceful stop through.
DEFAULT_WAIT = 60.0
# A master publishes its pool's figures on its first turn, a moment after it starts; a command
# that reads them waits this long at most.
PUBLISH_WAIT = 5.0
# How often a waiting control command reads the pidfile and the scoreboard.
POLL_INTERVAL = 0.05
# `prefork status` measures CPU % between two readings of each process this far apart.
CPU_SAMPLE_INTERVAL = 0.1
# `prefork status` calls a pool unhealthy when fewer workers serve than its target for longer
# than this (--grace): long enough for a replacement or a scale-up to boot, short enough for a
# health check to notice a pool that has stopped serving.
DEFAULT_GRACE = 10.0
# The master publishes its health on every turn of its loop, at least once a second (TICK_IDLE);
# a reading this much older means the master is stuck.
STALE_MASTER = 10.0
# This many workers in a row dying before they serve is a crash loop, not bad luck.
CRASH_LOOP = 3

# The most workers `prefork scale` asks for: as many as the `workers` setting may be.
MAX_WORKERS = config.MAX_WORKERS

_READY = (IDLE, BUSY)
_SCALE_TEXT = re.compile(r"([+-]?)([0-9]{1,6})")


# -- finding and watching the master -------------------------------------------------------------


@dataclasses.dataclass
class Master:
    """The running master named by a pidfile."""

    pidfile: str
    pid: int

    @classmethod
    def find(cls, args: argparse.Namespace) -> Master:
        pidfile = os.path.abspath(_pidfile(args))
        return cls(pidfile, read_pid(pidfile))

    @property
    def scoreboard(self) -> str:
        return f"{self.pidfile}.scoreboard"

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError as exc:
            raise PidfileError(f"no master running: pidfile {self.pidfile} names pid {self.pid}, "
                               f"which has exited") from exc
        except PermissionError as exc:
            raise PreforkError(f"cannot signal master {self.pid} (pidfile {self.pidfile}): permission "
                               f"denied; run the command as the master's user") from exc

    def snapshot(self, doing: str = "") -> tuple[MasterView, list[SlotView]]:
        """The scoreboard's header and used slots; PreforkError if the master has gone."""
        view, slots, _ = self.reading(doing)
        return view, slots

    def reading(self, doing: str = "") -> tuple[MasterView, list[SlotView], list[Histogram]]:
        """The snapshot and the latency histogram of each listener counter."""
        if doing and not is_running(self.pid):
            raise PreforkError(f"master {self.pid} exited while {doing}; see its error log")
        try:
            board = Scoreboard.open(self.scoreboard)
        except FileNotFoundError as exc:
            raise PreforkError(f"no scoreboard at {self.scoreboard}: is pid {self.pid} (from {self.pidfile}) "
                               f"a prefork master?") from exc
        except ValueError as exc:  # not a scoreboard, or an empty file
            raise PreforkError(f"cannot read the scoreboard {self.scoreboard}: {exc}") from exc
        except PermissionError as exc:  # the master's umask kept it from this user
            raise PreforkError(f"cannot read the scoreboard {self.scoreboard}: permission denied "
                               f"(run as the master's user, or give the master a umask that lets "
                               f"this user read it)") from exc
        try:
            return board.master(), board.used(), board.latency()
        finally:
            board.close()

    def published(self, timeout: float = PUBLISH_WAIT) -> tuple[MasterView, list[SlotView], list[Histogram]]:
        """A snapshot once the master has published its pool's figures (generation 1 or more).

        The header is written on each turn of the master's loop, so for a moment after the
        start it still reads generation 0 and target 0, while workers already fill slots.
        """
        _wait(f"master {self.pid} publishing its pool in {self.scoreboard}",
              lambda: self.snapshot("starting")[0].generation > 0, timeout)
        return self.reading()


def _pidfile(args: argparse.Namespace) -> str:
    """--pidfile, else the pidfile setting from the config file and the environment, else the
    default pidfile of the one master running (of service --name, or the configured name)."""
    if args.pidfile:
        return str(args.pidfile)
    settings, _ = config.load(["-c", args.config] if args.config else [])
    if settings.pidfile:
        return str(settings.pidfile)
    return runpaths.find_pidfile(args.name or settings.name or None)


def _settled(view: MasterView, slots: list[SlotView], generation: int | None = None) -> bool:
    """True when the pool has its target size, every worker accepting (and of *generation*)."""
    return len(slots) == view.target and all(
        slot.pid and slot.state in _READY and (generation is None or slot.generation == generation)
        for slot in slots)


def _wait(what: str, done: Callable[[], bool], timeout: float, hint: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise PreforkError(f"{what}: not complete after {timeout:g} s{hint}")
        time.sleep(POLL_INTERVAL)


# -- prefork reload, stop, upgrade, scale, reopen-logs --------------------------------------------


def cmd_reload(args: argparse.Namespace) -> int:
    master = Master.find(args)
    master.published()
    watch = _ReloadWatch(master, report_path(master.pidfile))
    master.signal(signal.SIGHUP)
    _wait(f"reload of master {master.pid}", watch.done, args.timeout,
          "; the new workers are not all accepting yet, see the master's error log")
    report = watch.report
    assert report is not None
    for line in report.changes:
        print(line)
    print(f"reloaded: master {master.pid} runs {_workers(watch.workers)} of generation {report.generation}")
    if report.held:
        for line in report.held:
            print(f"not applied: {line}", file=sys.stderr)
        return EXIT_NOT_APPLIED
    return EXIT_OK


class _ReloadWatch:
    """Follows a reload through the master's report (PIDFILE.reload) and the scoreboard.

    The report's sequence number tells our HUP's outcome from an earlier one: refused (the
    configuration, a listener or a hook could not be used), cancelled (the new workers could
    not start; the old ones keep serving), or reloaded once every worker is of the new
    generation and accepts.
    """

    def __init__(self, master: Master, path: str) -> None:
        self.master = master
        self.path = path
        before = read_report(path)
        self.seq = before.seq if before is not None and before.pid == master.pid else 0
        self.report: ReloadReport | None = None
        self.workers = 0

    def done(self) -> bool:
        view, slots = self.master.snapshot("reloading")
        report = read_report(self.path)
        if report is None or report.pid != self.master.pid or report.seq <= self.seq:
            return False
        if report.outcome == REFUSED:
            raise PreforkError(f"master {self.master.pid} refused the reload, the running configuration "
                               f"stays: {report.error}", exit_code=report.exit_code or EXIT_FAILURE)
        if report.outcome == CANCELLED:
            raise PreforkError(f"master {self.master.pid} cancelled the reload, the old workers keep serving "
                               f"with the configuration they had: {report.error}", exit_code=report.exit_code)
        self.report, self.workers = report, len(slots)
        return report.outcome == RELOADED and _settled(view, slots, report.generation)


def cmd_stop(args: argparse.Namespace) -> int:
    master = Master.find(args)
    master.signal(signal.SIGQUIT if args.fast else signal.SIGTERM)
    _wait(f"{'fast' if args.fast else 'graceful'} stop of master {master.pid}",
          lambda: not is_running(master.pid), args.timeout)
    print(f"stopped: master {master.pid}")
    return EXIT_OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    master = Master.find(args)
    watch = _UpgradeWatch(master)
    master.signal(signal.SIGUSR2)
    _wait(f"upgrade of master {master.pid}", watch.done, args.timeout,
          "; see the error log of both masters")
    print(f"upgraded: master {watch.new_pid} runs {watch.workers} workers; master {master.pid} is "
          f"stopping gracefully")
    return EXIT_OK


class _UpgradeWatch:
    """Follows an upgrade: the pidfile moves to PIDFILE.oldbin, then names the new master."""

    def __init__(self, old: Master) -> None:
        self.old = old
        self.oldbin = f"{old.pidfile}.oldbin"
        self.handed_over = False  # the old master has moved its pidfile aside
        self.new_pid = 0
        self.workers = 0

    def done(self) -> bool:
        pid = _live_pid(self.old.pidfile)
        if pid != self.old.pid or os.path.exists(self.oldbin):
            self.handed_over = True
        if pid is None or pid == self.old.pid:
            self._check_failed(pid)
            return False
        return self._new_master_ready(Master(self.old.pidfile, pid))

    def _check_failed(self, pid: int | None) -> None:
        if self.handed_over and pid == self.old.pid and not os.path.exists(self.oldbin):
            raise PreforkError(f"upgrade failed: the new master exited and master {self.old.pid} keeps "
                               f"serving; see its error log")
        if pid is None and not is_running(self.old.pid):
            raise PreforkError(f"upgrade failed: master {self.old.pid} exited and no new master wrote "
                               f"{self.old.pidfile}; see the error log")

    def _new_master_ready(self, new: Master) -> bool:
        try:
            view, slots = new.snapshot()
        except PreforkError:
            return False  # the new master has not written its scoreboard yet
        if view.pid != new.pid or view.target < 1 or not _settled(view, slots):
            return False
        self.new_pid, self.workers = new.pid, len(slots)
        return True


def _live_pid(pidfile: str) -> int | None:
    try:
        return read_pid(pidfile)
    except PidfileError:
        return None  # missing or stale for a moment while the masters hand over


def cmd_scale(args: argparse.Namespace) -> int:
    change = _parse_scale(args.count)
    master = Master.find(args)
    current = master.published()[0].target
    desired = _scale_target(args.count, change, current)
    deadline = time.monotonic() + args.timeout
    while current != desired:
        step = 1 if desired > current else -1
        master.signal(signal.SIGTTIN if step > 0 else signal.SIGTTOU)
        expected = current + step
        _wait(f"scaling master {master.pid} to {_workers(expected)}",
              lambda: master.snapshot("scaling")[0].target == expected, max(0.0, deadline - time.monotonic()))
        current = expected
    _wait(f"scaling master {master.pid} to {_workers(desired)}", lambda: _settled(*master.snapshot("scaling")),
          max(0.0, deadline - time.monotonic()))
    print(f"scaled: master {master.pid} runs {_workers(desired)}")
    return EXIT_OK


def _parse_scale(text: str) -> tuple[str, int]:
    """'3' -> ('', 3), '+2' -> ('+', 2), '-1' -> ('-', 1); ConfigError for anything else."""
    match = _SCALE_TEXT.fullmatch(text)
    if match is None:
        raise ConfigError(f"scale: {text!r} is not allowed; expected N, +N or -N (a number of workers)")
    return match.group(1), int(match.group(2))


def _scale_target(text: str, change: tuple[str, int], current: int) -> int:
    sign, number = change
    desired = current + number if sign == "+" else current - number if sign == "-" else number
    if not 1 <= desired <= MAX_WORKERS:
        raise ConfigError(f"scale: {text!r} would make {_workers(desired)} (now {current}); "
                          f"allowed: 1 to {MAX_WORKERS}")
    return desired


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def cmd_reopen_logs(args: argparse.Namespace) -> int:
    master = Master.find(args)
    master.signal(signal.SIGUSR1)
    # Nothing a reader can see records that files were reopened, so there is nothing to wait
    # for: the master reopens its own and passes USR1 on to every worker in its next turn.
    print(f"sent SIGUSR1: master {master.pid} and its workers reopen their log files")
    return EXIT_OK


# -- prefork status ------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """0 when the pool is healthy, EXIT_UNHEALTHY (with the reasons) when it is not."""
    master = Master.find(args)
    report = _status_report(master, args.grace)
    print(json.dumps(report, indent=2) if args.json else _format_status(report))
    return EXIT_OK if report["health"]["healthy"] else EXIT_UNHEALTHY


def _problems(view: MasterView, slots: list[SlotView], now: float, grace: float, serving: int) -> list[str]:
    """Why the pool is not healthy; empty when it is. Measured, not assumed: workers count as
    serving (*serving*, from ``_serving``) only when their slots say they accept."""
    health = view.health
    assert health is not None
    problems = []
    if health.stopping:
        problems.append("the master is stopping")
    if now - health.tick > STALE_MASTER:
        problems.append(f"the master has not turned its loop for {now - health.tick:.0f} s")
    if view.target < 1:
        problems.append("no worker is meant to run (the pool was scaled to 0, e.g. by SIGWINCH)")
    elif serving < view.target and health.short_since and now - health.short_since > grace:
        problems.append(f"{serving} of {view.target} workers serving, for {now - health.short_since:.0f} s")
    for slot in slots:
        if slot.pid and slot.stalled(now) and slot.loop_stalled(now) > grace:
            problems.append(f"worker {slot.number} (pid {slot.pid}): its event loop has not turned for "
                            f"{slot.loop_stalled(now):.0f} s, so it serves nothing")
    if health.crash_streak >= CRASH_LOOP:
        problems.append(f"crash loop: {health.crash_streak} workers in a row died before serving; the last: "
                        f"{health.last_crash}")
    return problems


def _serving(slots: list[SlotView], now: float) -> int:
    """Workers whose slots say they accept: idle or busy, and not a stalled event loop."""
    return sum(1 for slot in slots if slot.pid and slot.state in _READY and not slot.stalled(now))


def _status_report(master: Master, grace: float = DEFAULT_GRACE) -> dict[str, Any]:
    view, slots, latency = master.published()
    readings = _sample([master.pid, *(slot.pid for slot in slots if slot.pid)])
    now = time.monotonic()
    serving = _serving(slots, now)
    problems = _problems(view, slots, now, grace, serving)
    return {
        "health": {"healthy": not problems, "problems": problems, "serving": serving},
        "pidfile": master.pidfile,
        "master": {"pid": master.pid, "title": _title(master.pid), "generation": view.generation,
                   "target": view.target, "workers": len(slots), "uptime": round(now - view.started, 3),
                   "restarts": view.restarts, **_usage(readings.get(master.pid))},
        "listeners": listener_rows(view, slots, latency),
        "workers": [_worker_row(slot, readings.get(slot.pid), now) for slot in slots],
    }


def listener_rows(view: MasterView, slots: list[SlotView], latency: list[Histogram]) -> list[dict[str, Any]]:
    """Each listener: its accept-queue depth (None where unknown), requests its live workers have
    served, and its latency (count, sum, p50, p99 in seconds) since the master started."""
    return [{"name": name, "queue_depth": None if depth == NO_DEPTH else depth,
             "requests": sum(slot.by_listener[i] for slot in slots if i < len(slot.by_listener)),
             "latency": latency[i].summary() if i < len(latency) else Histogram().summary()}
            for i, (name, depth) in enumerate(zip(view.listeners, view.queue_depth))]


def _sample(pids: list[int]) -> dict[int, ProcStats | None]:
    """Memory (RSS, USS) and CPU % of each process, the CPU over CPU_SAMPLE_INTERVAL."""
    sampler = CpuSampler()
    for pid in pids:
        stats(pid, sampler=sampler)
    time.sleep(CPU_SAMPLE_INTERVAL)  # a measuring interval, not a wait for something to happen
    return {pid: stats(pid, with_uss=True, sampler=sampler) for pid in pids}


def _worker_row(slot: SlotView, reading: ProcStats | None, now: float) -> dict[str, Any]:
    return {"pid": slot.pid, "number": slot.number, "generation": slot.generation, "state": slot.shown_state(now),
            "requests": slot.requests, "request_age": round(slot.shown_age(now), 3),
            "loop_stalled": round(slot.loop_stalled(now), 3) if slot.event_loop else None,
            "client": slot.client, "listener": slot.listener, "uptime": round(now - slot.started, 3),
            **_usage(reading)}


def _usage(reading: ProcStats | None) -> dict[str, Any]:
    if reading is None:
        return {"rss": None, "uss": None, "cpu_percent": None}
    cpu = None if reading.cpu_percent is None else round(reading.cpu_percent, 1)
    return {"rss": reading.rss, "uss": reading.uss, "cpu_percent": cpu}


def _title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()  # setproctitle pads with spaces
    except psutil.Error:
        return ""  # gone or not ours to read: the title is a nicety


def _format_status(report: dict[str, Any]) -> str:
    m = report["master"]
    restarts = ", ".join(f"{cause} {count}" for cause, count in m["restarts"].items())
    health = report["health"]
    verdict = "healthy" if health["healthy"] else "UNHEALTHY: " + "; ".join(health["problems"])
    head = (f"master {m['pid']}  {m['title']}\n"
            f"  {verdict}: {health['serving']} of {m['target']} workers serving\n"
            f"  generation {m['generation']}, {m['workers']} of {m['target']} workers, up {duration_text(m['uptime'])}, "
            f"RSS {size_text(m['rss'])}, USS {size_text(m['uss'])}, CPU {percent_text(m['cpu_percent'])}\n"
            f"  restarts: {restarts}\n" + "".join(f"  {_listener_line(row)}\n" for row in report["listeners"]))
    rows = [("PID", "#", "GEN", "STATE", "REQUESTS", "REQ AGE", "RSS", "USS", "CPU", "UP")]
    for w in report["workers"]:
        age = duration_text(w["request_age"]) if w["state"] in AGED_STATES else "-"
        rows.append((str(w["pid"]), str(w["number"]), str(w["generation"]), w["state"], str(w["requests"]),
                     age, size_text(w["rss"]), size_text(w["uss"]), percent_text(w["cpu_percent"]), duration_text(w["uptime"])))
    return head + "\n" + columns(rows)


def _listener_line(row: dict[str, Any]) -> str:
    latency, depth = row["latency"], row["queue_depth"]
    return (f"{row['name']}: queue {'-' if depth is None else depth}, {latency['count']} requests, "
            f"p50 {millis_text(latency['p50'])}, p99 {millis_text(latency['p99'])}")


def millis_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def size_text(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return "-"


def percent_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
