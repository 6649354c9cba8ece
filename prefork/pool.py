"""The pool policy: which workers to start, stop and kill. Runs in: master.

Rules:

1. Pure: no system calls, no clock, no randomness of its own. Events come in (``start``,
   ``spawned``, ``exited``, ``tick`` with scoreboard readings, operator requests) with the
   current time; actions go out (``Spawn``, ``Stop``, ``Kill``, ``Halt``, ``Notify``). The arbiter
   carries the actions out. Tests drive it with plain values.
2. Capacity never dips for a replacement: a worker to be replaced (new generation after a
   reload, or recycled) is stopped only once its successor reports that it accepts, and only
   one replacement is in flight at a time.
3. A worker that cannot boot the app stops the service (exit code 3); workers that die before
   serving (young and without a request, or before they ever accepted) are restarted with
   exponential back-off, never in a tight fork loop, and a crash loop ends: after
   ``crash_limit`` such deaths in a row, or ``crash_timeout`` seconds of them, the service
   halts with exit code 3 and the last cause. During a reload, a new worker that dies before
   it accepts cancels the reload instead: the older generation, its configuration and its
   pool size stay. A worker that served is proof the app runs: its death (a poison request,
   the OOM killer, an operator's kill) is replaced at once, so such deaths cannot empty the pool.
4. ``timeout``: a synchronous worker busy on one request for longer, or an event-loop worker
   (its slot says so) whose loop has not turned for longer, busy or idle (a loop blocked by a
   callback or a background task, with no connection open, is as stuck), is first sent SIGABRT
   (its tracebacks are dumped), then SIGKILL after a short grace. Idle synchronous workers are
   never killed for it: they wait in the kernel and have no request to be late on.
5. A worker's life is a ``Phase``; every step it takes is in ``TRANSITIONS`` (a step outside it
   raises). Two facts outlive the phase that set them: whether it ever accepted (its death is
   then no boot failure) and why it is to be replaced (still so once aborted, until stopped).
"""

from __future__ import annotations

import dataclasses
import enum
import random
import signal
from typing import Any, Mapping, Union

from prefork.errors import EXIT_APP_LOAD, EXIT_OK
from prefork.scoreboard import BOOTING, BUSY, IDLE, STOP_RETIRE, STOP_SHUTDOWN, Health, SlotView

__all__ = ["Pool", "PoolConfig", "WorkerRecord", "Phase", "TRANSITIONS", "Spawn", "Stop", "Kill", "Halt",
           "Notify", "WORKER_BOOT_FAILED"]

# Exit status of a worker that could not load the app. Distinct from anything an app's
# sys.exit() is likely to use by accident; the master turns it into its own exit code 3.
WORKER_BOOT_FAILED = 86

# A worker that dies within this many seconds of its start "died young": the next start waits.
YOUNG_AGE = 5.0
# Back-off after the n-th young death in a row: BACKOFF_BASE * 2**(n-1), at most BACKOFF_MAX.
BACKOFF_BASE = 0.1
BACKOFF_MAX = 30.0
# After SIGABRT for a timeout, the worker has this long to dump its tracebacks before SIGKILL.
ABORT_GRACE = 2.0
# A fast stop (INT, QUIT) gives workers this long to leave before SIGKILL.
FAST_STOP_GRACE = 2.0
# How often the arbiter ticks when nothing is pending, and while a worker is booting.
TICK_IDLE = 1.0
TICK_BUSY = 0.05
# Adaptive pool: at most this many workers started in one tick (Apache's prefork cap).
MAX_SPAWN_RATE = 32


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """The settings the policy reads: built from prefork.config.Settings by ``from_settings``.

    No defaults here: the one declaration of each setting (its default too) is in prefork.config.
    """

    workers: int
    timeout: float
    graceful_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_worker_memory: int
    max_worker_lifetime: float
    min_workers: int
    max_workers: int
    min_spare: int
    max_spare: int
    crash_limit: int
    crash_timeout: float

    @classmethod
    def from_settings(cls, settings: Any) -> PoolConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(settings, name) for name in names})

    @property
    def adaptive(self) -> bool:
        return self.max_workers > 0


class Phase(enum.Enum):
    """Where a worker is in its life, as the master sees it."""

    BOOTING = "booting"  # forked; has not accepted yet
    SERVING = "serving"  # accepts, and stays
    OUTGOING = "outgoing"  # to be replaced: stopped once its successor accepts (maybe still booting)
    STOPPING = "stopping"  # asked to stop (SIGTERM); SIGKILL after graceful_timeout
    ABORTED = "aborted"  # sent SIGABRT (timeout) to dump its tracebacks; SIGKILL after ABORT_GRACE
    KILLED = "killed"  # sent SIGKILL: nothing more is sent; gone once reaped


# Every step of a worker's life. A step not in the table is a bug in the policy.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    # Any phase before STOPPING goes to KILLED in a fast stop (SIGQUIT, then SIGKILL).
    Phase.BOOTING: frozenset({Phase.SERVING, Phase.OUTGOING, Phase.STOPPING, Phase.ABORTED, Phase.KILLED}),
    Phase.SERVING: frozenset({Phase.OUTGOING, Phase.STOPPING, Phase.ABORTED, Phase.KILLED}),
    # Back to SERVING (or BOOTING) when the reload that replaces it is cancelled.
    Phase.OUTGOING: frozenset({Phase.SERVING, Phase.BOOTING, Phase.STOPPING, Phase.ABORTED, Phase.KILLED}),
    Phase.STOPPING: frozenset({Phase.ABORTED, Phase.KILLED}),  # aborted: busy past timeout while draining
    Phase.ABORTED: frozenset({Phase.KILLED}),  # a stop sent to it keeps it ABORTED: SIGKILL follows anyway
    Phase.KILLED: frozenset(),
}
# The phases in which nothing has been sent to end the worker yet.
RUNNING = frozenset({Phase.BOOTING, Phase.SERVING, Phase.OUTGOING})


@dataclasses.dataclass
class WorkerRecord:
    """What the master knows of one worker."""

    slot: int
    number: int
    generation: int
    spawned_at: float
    max_requests: int = 0
    pid: int = 0
    phase: Phase = Phase.BOOTING
    accepted: bool = False  # it has accepted: its death is no boot failure (kept in every later phase)
    reason: str = ""  # why it is to be replaced, while it is (kept if it is aborted or killed)
    stop_sent_at: float | None = None
    abort_sent_at: float | None = None

    @property
    def stopping(self) -> bool:
        """It was asked to stop (SIGTERM): it no longer counts in the pool."""
        return self.stop_sent_at is not None

    @property
    def outgoing(self) -> bool:
        return bool(self.reason)

    def move(self, phase: Phase) -> None:
        """Take one step of its life; ValueError for a step the table does not have."""
        if phase not in TRANSITIONS[self.phase]:
            raise ValueError(f"worker {self.number}: no step from {self.phase.value} to {phase.value}")
        self.phase = phase


@dataclasses.dataclass(frozen=True)
class Spawn:
    worker: WorkerRecord


@dataclasses.dataclass(frozen=True)
class Stop:
    """Ask a worker to stop gracefully (SIGTERM); *mode* is written to its slot first."""

    worker: WorkerRecord
    mode: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Kill:
    """Send *signum* to a worker (SIGABRT on timeout, SIGKILL, SIGQUIT for a fast stop)."""

    worker: WorkerRecord
    signum: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Halt:
    """The master should exit with *exit_code*; every worker is gone."""

    exit_code: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Notify:
    """A state change worth telling the service manager and the hooks: 'ready', 'reloaded', or
    'cancelled' (a reload whose new workers died before accepting; *reason* says how)."""

    event: str
    reason: str = ""


Action = Union[Spawn, Stop, Kill, Halt, Notify]


class Pool:
    """The supervision policy of one master."""

    def __init__(self, config: PoolConfig, capacity: int, rng: random.Random | None = None) -> None:
        self.config = config
        self.capacity = capacity
        self.generation = 1
        self.target = config.min_workers if config.adaptive else config.workers
        self.workers: dict[int, WorkerRecord] = {}  # by slot
        self.stopping: str = ""  # "", "graceful" or "fast"
        self.stop_started = 0.0
        self.exit_code = EXIT_OK
        self.exit_reason = ""
        self._young_deaths = 0  # workers in a row that died before serving: the crash streak
        self._streak_started = 0.0
        self.last_crash = ""  # how the last worker that died before serving ended
        self._short_since = 0.0  # since when fewer workers serve than the target (0: not short)
        self._before_reload: tuple[PoolConfig, int] | None = None
        self._cancelled: set[int] = set()  # generations of cancelled reloads
        self._next_spawn_at = 0.0
        self._announced_ready = False
        self._reload_pending = False
        self._spawn_rate = 1
        self._rng = rng or random.Random()
        self.reload_failures = 0
        self.restarts: dict[str, int] = {"exit": 0, "timeout": 0, "recycle": 0, "crash": 0}

    # -- events ----------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        return self._maintain(now)

    def spawned(self, worker: WorkerRecord, pid: int) -> None:
        """The arbiter forked *worker* as *pid*."""
        worker.pid = pid

    def spawn_failed(self, worker: WorkerRecord, now: float) -> None:
        """fork() failed: forget the record and back off as after a young death."""
        self.workers.pop(worker.slot, None)
        self._died_young(now)

    def exited(self, pid: int, exit_code: int, now: float, served: int = 0, cause: str = "",
               slots: Mapping[int, SlotView] | None = None) -> list[Action]:
        """The worker *pid* exited with *exit_code* after serving *served* requests.

        *cause* says how it ended ("exit status 1: ..."), for the halt of a crash loop. *slots*:
        the workers' slots as of now (by slot index; the dead one's is not read). The verdict on a death depends on
        whether any other worker accepts, and one may have begun to since the last tick: a
        reload's new worker that fails at once must cancel the reload, not halt a master whose
        old worker already serves.
        """
        worker = self.by_pid(pid)
        if worker is None:
            return []
        del self.workers[worker.slot]
        if slots:
            for other in self.workers.values():
                view = slots.get(other.slot)
                if view is not None and _says_accepting(other, view):
                    _mark_accepted(other)
        if self.stopping or worker.stopping:
            self._count_exit(worker, exit_code, now, served)
            return self._after_change(now)
        if worker.generation in self._cancelled:
            self.restarts["crash" if exit_code else "exit"] += 1
            return self._after_change(now)  # one of a cancelled reload's: it said all there is
        if exit_code == WORKER_BOOT_FAILED and not any(w.accepted for w in self._live()):
            return self.stop(now, fast=True, exit_code=EXIT_APP_LOAD,
                             reason=f"worker {worker.number} could not load the app")
        if exit_code == WORKER_BOOT_FAILED or not served and (not worker.accepted or now - worker.spawned_at < YOUNG_AGE):
            return self._died_before_serving(worker, exit_code, now, cause)
        self._count_exit(worker, exit_code, now, served)
        return self._after_change(now)

    def _died_before_serving(self, worker: WorkerRecord, exit_code: int, now: float, cause: str) -> list[Action]:
        """A crash: back off, cancel a reload in flight, or end a crash loop with a halt."""
        self.restarts["crash" if exit_code else "exit"] += 1
        self.last_crash = f"worker {worker.number} (generation {worker.generation}) {cause or 'died'}"
        if self._reloading(worker):
            return self._cancel_reload(worker, now, self.last_crash)
        if not self._young_deaths:
            self._streak_started = now
        self._died_young(now)
        cfg = self.config
        lasted = now - self._streak_started
        if cfg.crash_limit and self._young_deaths >= cfg.crash_limit or cfg.crash_timeout and lasted >= cfg.crash_timeout:
            return self.stop(now, fast=True, exit_code=EXIT_APP_LOAD,
                             reason=f"crash loop: {self._young_deaths} workers in a row died before serving "
                                    f"(over {lasted:.1f}s); the last: {self.last_crash}")
        return self._after_change(now)

    def _reloading(self, worker: WorkerRecord) -> bool:
        """True if *worker* is of a reload in flight, whose older workers still serve."""
        return (self._reload_pending and worker.generation == self.generation
                and any(w.generation < worker.generation and w.accepted for w in self._live()))

    def _cancel_reload(self, worker: WorkerRecord, now: float, cause: str) -> list[Action]:
        """The new generation cannot serve: the older one stays, with the pool it had."""
        self.reload_failures += 1
        self._reload_pending = False
        self._cancelled.add(worker.generation)
        self.generation += 1  # replacements from now on are of the configuration that serves
        if self._before_reload is not None:
            self.config, self.target = self._before_reload
            self._before_reload = None
        for other in self._live():
            if other.generation < worker.generation:
                _keep(other)
            elif other.generation == worker.generation and not other.accepted:
                _replace(other, "reload cancelled")
        reason = f"worker {worker.number} of generation {worker.generation} could not start: {cause or 'died'}"
        return [Notify("cancelled", reason)] + self._after_change(now)

    def tick(self, now: float, slots: Mapping[int, SlotView], rss: Mapping[int, int] | None = None) -> list[Action]:
        """Periodic look at the scoreboard (*slots* by slot index) and memory (*rss* by pid)."""
        actions: list[Action] = []
        for worker in list(self.workers.values()):
            view = slots.get(worker.slot)
            if view is not None and view.pid == worker.pid:
                actions += self._watch(worker, view, now, (rss or {}).get(worker.pid))
        actions += self._escalate_stops(now)
        if self.config.adaptive and not self.stopping:
            self._adapt(slots)
        return actions + self._after_change(now)

    # -- operator requests -----------------------------------------------------------------------

    def stop(self, now: float, fast: bool = False, exit_code: int = EXIT_OK, reason: str = "",
             handover: bool = False) -> list[Action]:
        """TERM (graceful) or INT/QUIT (fast): stop every worker, then Halt.

        *handover*: a new master serves the same listeners (USR2), so the workers retire
        without draining them; a shared listener under steady load is never empty.
        """
        if self.stopping == "fast" or (self.stopping and not fast):
            return self._after_change(now)
        self.stopping, self.stop_started = ("fast" if fast else "graceful"), now
        self.exit_code, self.exit_reason = exit_code, reason or ("fast stop" if fast else "graceful stop")
        actions: list[Action] = []
        for worker in self.workers.values():
            if fast:
                actions.append(Kill(worker, signal.SIGQUIT, self.exit_reason))
            elif not worker.stopping:
                mode = STOP_RETIRE if handover else STOP_SHUTDOWN
                actions.append(self._stop(worker, now, mode, self.exit_reason))
        return actions + self._after_change(now)

    def reload(self, now: float, config: PoolConfig | None = None) -> list[Action]:
        """HUP: a new generation replaces every worker, one at a time."""
        if self.stopping:
            return []
        self._before_reload = (self.config, self.target)
        if config is not None:
            self.config = config
            self.target = max(config.min_workers, self.target) if config.adaptive else config.workers
        elif not self.config.adaptive:
            self.target = self.config.workers  # a reload also undoes WINCH
        self.generation += 1
        self._reload_pending = True
        for worker in self._live():
            _replace(worker, worker.reason or "reload")
        return self._after_change(now)

    def scale(self, now: float, target: int) -> list[Action]:
        """TTIN / TTOU / WINCH / `prefork scale`: a new target size (at least 0)."""
        if self.stopping:
            return []
        self.target = max(0, target)
        return self._after_change(now)

    # -- queries ---------------------------------------------------------------------------------

    def by_pid(self, pid: int) -> WorkerRecord | None:
        for worker in self.workers.values():
            if worker.pid == pid:
                return worker
        return None

    def wait_hint(self, now: float) -> float:
        """How long the arbiter may sleep before the policy needs another tick."""
        if any(not w.accepted and not w.stopping for w in self.workers.values()) or self.stopping:
            return TICK_BUSY
        if self._next_spawn_at > now:
            return min(TICK_IDLE, self._next_spawn_at - now)
        return TICK_IDLE

    def health(self, now: float) -> Health:
        """The pool's health for `prefork status` (also tracks since when the pool is short)."""
        ready = sum(1 for w in self._live() if w.accepted)
        if ready >= self.target:
            self._short_since = 0.0
        elif not self._short_since:
            self._short_since = now
        return Health(now, self._short_since, self._young_deaths, bool(self.stopping), self.last_crash)

    def statistics(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "target": self.target,
            "workers": len(self.workers),
            "ready": sum(1 for w in self.workers.values() if w.accepted and not w.stopping),
            "stopping": self.stopping,
            "restarts": dict(self.restarts),
        }

    # -- internals -------------------------------------------------------------------------------

    def _live(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if not w.stopping]

    def _watch(self, worker: WorkerRecord, view: SlotView, now: float, rss: int | None) -> list[Action]:
        if _says_accepting(worker, view):
            _mark_accepted(worker)
        if self._young_deaths and (view.requests or worker.accepted and now - worker.spawned_at >= YOUNG_AGE):
            self._young_deaths = 0  # a worker serves, or has lived long enough: the streak is over
        if worker.phase is Phase.KILLED:
            return []
        if worker.phase is Phase.ABORTED:
            waited = now - worker.abort_sent_at if worker.abort_sent_at is not None else 0.0
            return [_kill(worker, "did not exit after SIGABRT")] if waited >= ABORT_GRACE else []
        timeout = self.config.timeout
        overdue = _overdue(view, now, timeout) if timeout else ""
        if overdue:
            self.restarts["timeout"] += 1
            return [_abort(worker, now, overdue)]
        if timeout and not worker.accepted and now - worker.spawned_at > max(timeout, YOUNG_AGE):
            return [_abort(worker, now, f"still booting after {now - worker.spawned_at:.1f}s")]
        if worker.phase is Phase.SERVING:
            _replace(worker, self._recycle_reason(worker, view, now, rss))
            if worker.outgoing:
                self.restarts["recycle"] += 1
        return []

    def _recycle_reason(self, worker: WorkerRecord, view: SlotView, now: float, rss: int | None) -> str:
        cfg = self.config
        if worker.max_requests and view.requests >= worker.max_requests:
            return f"served {view.requests} requests (max_requests {worker.max_requests})"
        if cfg.max_worker_memory and rss is not None and rss > cfg.max_worker_memory:
            return f"RSS {rss} bytes above max_worker_memory {cfg.max_worker_memory}"
        if cfg.max_worker_lifetime and now - worker.spawned_at > cfg.max_worker_lifetime:
            return f"older than max_worker_lifetime {cfg.max_worker_lifetime:g}s"
        return ""

    def _escalate_stops(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for worker in self.workers.values():
            if worker.phase is Phase.KILLED or worker.stop_sent_at is None and self.stopping != "fast":
                continue
            since = worker.stop_sent_at if worker.stop_sent_at is not None else self.stop_started
            grace = FAST_STOP_GRACE if self.stopping == "fast" else self.config.graceful_timeout
            if now - since >= grace:
                actions.append(_kill(worker, f"still running {grace:g}s after it was asked to stop"))
        return actions

    def _adapt(self, slots: Mapping[int, SlotView]) -> None:
        cfg = self.config
        live = self._live()
        spare = sum(1 for w in live if not w.accepted or _state(slots, w) == IDLE)
        if spare < cfg.min_spare and self.target < cfg.max_workers:
            self.target = min(cfg.max_workers, self.target + self._spawn_rate)
            self._spawn_rate = min(self._spawn_rate * 2, MAX_SPAWN_RATE)
            return
        self._spawn_rate = 1
        if spare > cfg.max_spare and self.target > cfg.min_workers:
            self.target -= 1

    def _after_change(self, now: float) -> list[Action]:
        if self.stopping:
            if not self.workers:
                return [Halt(self.exit_code, self.exit_reason)]
            return []
        return self._maintain(now)

    def _maintain(self, now: float) -> list[Action]:
        stops = self._stop_excess(now)  # first, so a successor is not counted twice
        return stops + self._spawn_missing(now) + self._announce()

    def _spawn_missing(self, now: float) -> list[Action]:
        """Start workers up to the target, plus one successor while workers await replacement."""
        live = self._live()
        serving = [w for w in live if not w.outgoing]
        missing = self.target - len(live)
        successor_due = len(serving) < self.target and not any(not w.accepted for w in serving)
        if missing <= 0 and successor_due and len(serving) < len(live):
            missing = 1
        actions: list[Action] = []
        while missing > 0 and now >= self._next_spawn_at and len(self.workers) < self.capacity:
            actions.append(Spawn(self._new_worker(now)))
            missing -= 1
        return actions

    def _stop_excess(self, now: float) -> list[Action]:
        """Beyond the target: stop outgoing workers first (oldest first), then the highest numbers.

        Nothing is stopped while a serving worker is still booting, so a replaced worker leaves
        only once its successor accepts (unless the pool is being emptied).
        """
        live = self._live()
        excess = len(live) - self.target
        booting = any(not w.accepted for w in live if not w.outgoing)
        if excess <= 0 or (booting and self.target > 0):
            return []
        outgoing = sorted((w for w in live if w.outgoing), key=lambda w: (w.generation, w.number))
        serving = sorted((w for w in live if not w.outgoing), key=lambda w: (w.accepted, w.number), reverse=True)
        victims = (outgoing + serving)[:excess]
        return [self._stop(w, now, STOP_RETIRE, w.reason or "pool shrinks") for w in victims]

    def _announce(self) -> list[Action]:
        serving = [w for w in self._live() if not w.outgoing]
        all_ready = len(serving) >= self.target and all(w.accepted for w in serving)
        if not all_ready:
            return []
        if not self._announced_ready:
            self._announced_ready = True
            return [Notify("ready")]
        if self._reload_pending and not any(w.outgoing for w in self._live()):
            self._reload_pending = False
            self._before_reload = None
            return [Notify("reloaded")]
        return []

    def _stop(self, worker: WorkerRecord, now: float, mode: int, reason: str) -> Stop:
        worker.stop_sent_at = now
        if worker.phase in RUNNING:
            worker.move(Phase.STOPPING)
        return Stop(worker, mode, reason)

    def _new_worker(self, now: float) -> WorkerRecord:
        slot = next(i for i in range(self.capacity) if i not in self.workers)
        taken = {w.number for w in self._live() if not w.outgoing}
        number = next(n for n in range(1, self.capacity + 2) if n not in taken)
        jitter = self._rng.randint(0, self.config.max_requests_jitter) if self.config.max_requests_jitter else 0
        limit = self.config.max_requests + jitter if self.config.max_requests else 0
        worker = WorkerRecord(slot, number, self.generation, now, max_requests=limit)
        self.workers[slot] = worker
        return worker

    def _count_exit(self, worker: WorkerRecord, exit_code: int, now: float, served: int) -> None:
        if worker.stopping or self.stopping:
            self._young_deaths = 0 if worker.accepted else self._young_deaths
            return
        self.restarts["crash" if exit_code else "exit"] += 1
        self._young_deaths = 0  # it served, or lived past YOUNG_AGE: the app runs

    def _died_young(self, now: float) -> None:
        self._young_deaths += 1
        delay = min(BACKOFF_BASE * 2 ** (self._young_deaths - 1), BACKOFF_MAX)
        self._next_spawn_at = now + delay


def _says_accepting(worker: WorkerRecord, view: SlotView) -> bool:
    """*view*, *worker*'s slot, says it accepts for the first time (past BOOTING)."""
    return not worker.accepted and view.pid == worker.pid and view.state not in (BOOTING, 0)


def _mark_accepted(worker: WorkerRecord) -> None:
    """Its slot says it accepts (in whatever phase it is by then)."""
    worker.accepted = True
    if worker.phase is Phase.BOOTING:
        worker.move(Phase.SERVING)


def _replace(worker: WorkerRecord, reason: str) -> None:
    """Mark it to be replaced because of *reason* (nothing if *reason* is empty)."""
    worker.reason = reason
    if reason and worker.phase in (Phase.BOOTING, Phase.SERVING):
        worker.move(Phase.OUTGOING)


def _keep(worker: WorkerRecord) -> None:
    """It stays after all: the reload that replaces it was cancelled."""
    worker.reason = ""
    if worker.phase is Phase.OUTGOING:
        worker.move(Phase.SERVING if worker.accepted else Phase.BOOTING)


def _abort(worker: WorkerRecord, now: float, reason: str) -> Kill:
    worker.abort_sent_at = now
    worker.move(Phase.ABORTED)
    return Kill(worker, signal.SIGABRT, reason)


def _kill(worker: WorkerRecord, reason: str) -> Kill:
    worker.move(Phase.KILLED)
    return Kill(worker, signal.SIGKILL, reason)


def _state(slots: Mapping[int, SlotView], worker: WorkerRecord) -> int:
    view = slots.get(worker.slot)
    return view.state if view is not None and view.pid == worker.pid else BOOTING


def _overdue(view: SlotView, now: float, timeout: float) -> str:
    """Why the worker is past *timeout* (rule 4), or "" if it is not."""
    if view.event_loop:
        stalled = view.loop_stalled(now)
        return _stalled_reason(view, stalled) if stalled > timeout else ""
    return _timeout_reason(view, now) if view.state == BUSY and view.request_age(now) > timeout else ""


def _timeout_reason(view: SlotView, now: float) -> str:
    return (f"request from {view.client or '?'} on {view.listener or '?'} "
            f"running for {view.request_age(now):.1f}s (timeout)")


def _stalled_reason(view: SlotView, stalled: float) -> str:
    """The client is the one the worker's watchdog found on the blocking task, if it found one."""
    where = (f"blocked by a request from {view.client} on {view.listener or '?'}" if view.client
             else "blocked outside any connection's handler, by a callback or a task the worker's log names")
    return f"the event loop has not turned for {stalled:.1f}s, {where} (timeout)"

