"""The master's loop: fork, reap, signal and wait, on behalf of the pool policy. Runs in: master.

Rules:

1. This module decides when to fork, signal and reap; ``prefork.children`` is the only module
   that does it (``os.fork``, ``os.kill``, ``os.waitpid``), through one ``Child`` handle per
   child: each worker, the metrics process, the new master of an upgrade. The arbiter decides
   nothing about workers itself: events go to ``prefork.pool.Pool`` and its actions are carried out.
2. Single-threaded. Signal handlers only record (``prefork.signals``); the loop wakes on the
   signal pipe and dispatches to ``handle_<name>()``.
3. The master is never on the request path: it wakes for signals, child exits and a tick.
4. A generation of workers is built from a ``Plan`` (settings, listeners, worker spec, hooks).
   A reload makes a new plan from the whole new configuration; each plan is kept while
   workers of its generation live, and each listener while a kept plan has it: a listener a
   reload removed is closed (its Unix socket file removed) once its last worker has left,
   having answered what was queued on it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Protocol, Sequence

from prefork import notify, pool as policy
from prefork.accounting import accept_queue_length, unix_accept_queue_length
from prefork.children import Child, reap_exited, read_start_report, send_signal, send_start_report, stop_all
from prefork.errors import EXIT_APP_LOAD, EXIT_FAILURE, EXIT_OK, ConfigError, ListenerError, PidfileError, PreforkError
from prefork.handover import UPGRADE_PARENT_ENV, upgrade_parent  # the variable: set by USR2, names the old master
from prefork.listeners import Listener, inherit_env
from prefork.pidfile import Pidfile
from prefork.procstats import rss
from prefork.proctitle import set_title
from prefork.reloads import CANCELLED, RELOADED, REFUSED, STARTED, ReloadReport, report_path, write_report
from prefork.scoreboard import NO_DEPTH, Scoreboard, SlotView
from prefork.signals import MASTER_SIGNALS, SignalQueue, reset_to_defaults, signal_name
from prefork.servers import Poller
from prefork.worker import WorkerIdentity, WorkerSpec, flush_std_streams, run_worker

__all__ = ["Arbiter", "Hooks", "MasterSettings", "Plan", "UPGRADE_PARENT_ENV"]

log = logging.getLogger("prefork.master")

# Slots in the scoreboard: the most workers one master can run at once (surge included).
SCOREBOARD_CAPACITY = 1024
# How often worker memory is read for max_worker_memory (a /proc read per worker).
MEMORY_CHECK_INTERVAL = 1.0
# The metrics process gets this long to listen at start; a crashed one is restarted after this.
METRICS_START_TIMEOUT = 10.0
METRICS_RESTART_DELAY = 1.0


@dataclasses.dataclass
class Hooks:
    """User callables; each is called with the arbiter (and the worker record where relevant)."""

    on_starting: Callable[..., Any] | None = None
    when_ready: Callable[..., Any] | None = None
    pre_fork: Callable[..., Any] | None = None
    post_fork: Callable[..., Any] | None = None
    worker_exit: Callable[..., Any] | None = None
    on_exit: Callable[..., Any] | None = None


class MasterSettings(Protocol):
    """The settings the master reads itself (prefork.config.Settings has them; the master never
    imports it). The pool reads its own through ``PoolConfig.from_settings``."""

    @property
    def pidfile(self) -> str | None: ...
    @property
    def preload(self) -> bool: ...
    @property
    def max_worker_memory(self) -> int: ...
    @property
    def metrics_bind(self) -> str | None: ...


# What the metrics process serves: its address (metrics_bind), the service's name and its
# listeners' counter names; a change of any restarts it.
MetricsServes = tuple[str | None, str, tuple[str, ...]]


@dataclasses.dataclass
class Plan:
    """What one generation of workers is made of, prepared in the master before it forks them."""

    settings: MasterSettings
    listeners: list[Listener]
    spec: WorkerSpec
    hooks: Hooks
    changes: tuple[str, ...] = ()  # what differs from the plan before, one line per setting
    held: tuple[str, ...] = ()  # the settings it keeps from the plan before, each with why and how
    # The master's own part, run when the plan becomes the current one (log files, umask,
    # process title); raises PreforkError when it cannot be applied.
    enter: Callable[[], None] | None = None


class Arbiter:
    """Supervises the workers of one service until a stop signal; ``run()`` returns the exit code.

    *replan*, called on HUP with the current plan, returns the plan of the next generation
    (the configuration read again, added listeners bound) or raises PreforkError to refuse
    the reload; without it a reload starts a new generation of the same plan.
    """

    def __init__(self, plan: Plan, replan: Callable[[Plan], Plan] | None = None) -> None:
        self.plan = plan
        self.plans = {1: plan}  # by generation: the plan its workers were forked from
        self.replan = replan
        self._previous_plan = plan  # what a cancelled reload goes back to
        self._sockets: dict[int, Listener] = {}  # every listener the master holds, by id(socket)
        self.counter_names: list[str] = []  # the scoreboard's per-listener counters, by index
        self._take_listeners(plan)
        self.reload_seq = 0  # HUPs taken, for PIDFILE.reload
        self.pool = policy.Pool(policy.PoolConfig.from_settings(plan.settings), SCOREBOARD_CAPACITY)
        self.pid = os.getpid()
        self.signals: SignalQueue | None = None
        self.scoreboard: Scoreboard | None = None
        self.pidfile: Pidfile | None = None
        self.handles: dict[int, Child] = {}  # each worker's process, by pid
        self.upgrade: Child | None = None  # the new master of an upgrade in progress
        self.handed_over = False  # a new master took over: leave its sockets and pidfile alone
        self.metrics: Child | None = None
        self.reloads_refused = 0
        self._metrics_due = 0.0  # when to restart a metrics process that died
        self._metrics_serves: MetricsServes | None = None  # what the metrics process serves
        self.upgrade_parent = upgrade_parent(os.environ)  # ConfigError for a value that is no pid
        os.environ.pop(UPGRADE_PARENT_ENV, None)
        self._exit: policy.Halt | None = None
        self._boot_errors: tuple[int, ...] = ()  # pipe on which workers report why they cannot boot
        self._boot_messages: dict[int, str] = {}  # by pid: what a worker said before it died
        self._next_memory_check = 0.0

    @property
    def settings(self) -> MasterSettings:
        return self.plan.settings

    @property
    def listeners(self) -> list[Listener]:
        return self.plan.listeners

    @property
    def spec(self) -> WorkerSpec:
        return self.plan.spec

    @property
    def hooks(self) -> Hooks:
        return self.plan.hooks

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until a stop; returns the exit code."""
        with SignalQueue(MASTER_SIGNALS) as self.signals:
            try:
                self._start()
                self._loop()
            except PreforkError as exc:
                log.error("%s", exc)
                self._exit = policy.Halt(exc.exit_code, str(exc))
                self._kill_workers()
            finally:
                self._cleanup()
        code = self._exit.exit_code if self._exit else EXIT_FAILURE
        self._call_hook("on_exit", self)
        return code

    def _start(self) -> None:
        self._boot_errors = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.plan.enter is not None:
            self.plan.enter()
        if self.settings.pidfile:  # first: a live master's pidfile refuses us before we touch its scoreboard
            self.pidfile = Pidfile(self.settings.pidfile)
            self.pidfile.create(self.pid)
        self.scoreboard = Scoreboard.create(SCOREBOARD_CAPACITY, self._scoreboard_path())
        if self.settings.preload:
            gc.freeze()  # keep the preloaded app's objects out of the collector: pages stay shared
        self._start_metrics(wait=True)
        log.info("master %d serving %s with %d workers", self.pid,
                 ", ".join(l.name for l in self.listeners), self.pool.target)
        self._execute(self.pool.start(time.monotonic()))
        # Published at once: readers (the CLI, metrics) must never see the header's zeros.
        self._publish()

    def _loop(self) -> None:
        assert self.signals is not None
        with Poller() as poller:
            poller.add(self.signals.fileno())
            while self._exit is None:
                poller.wait(self.pool.wait_hint(time.monotonic()))
                for signum in self.signals.pop_all():
                    self._dispatch(signum)
                self._reap()
                self._tick()

    def _dispatch(self, signum: int) -> None:
        name = signal_name(signum).lower()
        handler = getattr(self, f"handle_{name}", None)
        if handler is None:
            return
        if signum != signal.SIGCHLD:
            log.info("master %d: SIG%s", self.pid, name.upper())
        handler()

    def _tick(self) -> None:
        assert self.scoreboard is not None
        now = time.monotonic()
        self._execute(self.pool.tick(now, self._slots(), self._memory(now)))
        self._publish()
        if self._metrics_due and now >= self._metrics_due and not self.pool.stopping:
            self._start_metrics(wait=False)

    def _slots(self) -> dict[int, SlotView]:
        """The pool's workers' slots as of now, by slot index. Only those: scanning the whole map
        would cost for nothing."""
        assert self.scoreboard is not None
        return {w.slot: self.scoreboard.read(w.slot) for w in self.pool.workers.values()}

    def _publish(self) -> None:
        assert self.scoreboard is not None
        pool = self.pool
        self.scoreboard.publish(pool.generation, pool.target, pool.restarts, self.reloads_refused,
                                pool.reload_failures)
        self.scoreboard.publish_health(pool.health(time.monotonic()))
        by_name = {listener.name: listener for listener in self._sockets.values()}
        self.scoreboard.publish_listeners(self.counter_names, [queue_depth(by_name.get(name))
                                                               for name in self.counter_names])

    def _memory(self, now: float) -> dict[int, int] | None:
        if not self.settings.max_worker_memory or now < self._next_memory_check:
            return None
        self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        readings = {w.pid: rss(w.pid) for w in self.pool.workers.values() if w.pid}
        return {pid: value for pid, value in readings.items() if value is not None}

    def _reap(self) -> None:
        for pid, code in reap_exited():
            if self.metrics is not None and pid == self.metrics.pid:
                self._metrics_exited(code)
            elif self.upgrade is not None and pid == self.upgrade.pid:
                self._upgrade_failed(code)
            elif pid in self.handles:
                self.handles.pop(pid).exited()
                self._worker_exited(pid, code)
            # else: a child of a hook, not ours to account for

    def _worker_exited(self, pid: int, code: int) -> None:
        worker = self.pool.by_pid(pid)
        if worker is None:
            return
        self._read_boot_messages()
        said = self._boot_messages.pop(pid, "")
        how = f"killed by SIG{signal_name(-code)}" if code < 0 else f"exit status {code}"
        self._log_exit(worker, code, how, said)
        assert self.scoreboard is not None
        view = self.scoreboard.read(worker.slot)  # read before release: what it served
        served = view.requests if view.pid == pid else 0
        self.scoreboard.release(worker.slot)
        self._call_hook("worker_exit", self, worker, plan=self.plans.get(worker.generation))
        cause = f"{how}: {said}" if said else how
        # The slots as of now: another worker may have begun to accept since the last tick, which
        # changes the verdict on this death (Pool.exited).
        self._execute(self.pool.exited(pid, code, time.monotonic(), served, cause, self._slots()))
        self._forget_finished_plans()

    def _log_exit(self, worker: policy.WorkerRecord, code: int, how: str, said: str) -> None:
        if worker.stopping or self.pool.stopping:
            log.info("worker %d (pid %d) stopped (%s)", worker.number, worker.pid, how)
        elif code == policy.WORKER_BOOT_FAILED:
            log.error("worker %d (pid %d) could not load the app: %s", worker.number, worker.pid, said or "see above")
        else:
            log.warning("worker %d (pid %d) died unexpectedly (%s)%s", worker.number, worker.pid, how,
                        f": {said}" if said else "")

    # -- carrying out the policy's actions -----------------------------------------------------

    def _execute(self, actions: Sequence[policy.Action]) -> None:
        for action in actions:
            if isinstance(action, policy.Spawn):
                self._spawn(action.worker)
            elif isinstance(action, policy.Stop):
                self._stop(action)
            elif isinstance(action, policy.Kill):
                self._kill(action)
            elif isinstance(action, policy.Notify):
                self._notify(action)
            elif isinstance(action, policy.Halt) and self._exit is None:
                self._exit = action  # its reason is the master's last line

    def _spawn(self, worker: policy.WorkerRecord) -> None:
        assert self.scoreboard is not None
        plan = self.plans.get(worker.generation, self.plan)
        plan.spec.boot_error_fd = self._boot_errors[1]
        self._call_hook("pre_fork", self, worker, plan=plan)
        self.scoreboard.claim(worker.slot, worker.number, worker.generation)
        try:
            # Blocked: a signal for the new worker must not reach our handlers.
            child = Child.fork(lambda: self._run_worker(worker, plan), block=MASTER_SIGNALS)
        except OSError as exc:
            log.error("cannot fork worker %d: %s", worker.number, exc)
            self.scoreboard.release(worker.slot)
            self.pool.spawn_failed(worker, time.monotonic())
            return
        self.handles[child.pid] = child
        self.scoreboard.set_pid(worker.slot, child.pid)
        self.pool.spawned(worker, child.pid)
        log.debug("worker %d (pid %d) generation %d started", worker.number, child.pid, worker.generation)

    def _run_worker(self, worker: policy.WorkerRecord, plan: Plan) -> None:
        """Called in the child of a worker's fork. Never returns."""
        assert self.scoreboard is not None
        identity = WorkerIdentity(worker.number, worker.generation, self.scoreboard.writer(worker.slot))
        own = {id(listener.sock) for listener in plan.listeners}
        others = [l.sock for key, l in self._sockets.items() if key not in own]
        run_worker(plan.spec, identity, self.signals, others)

    def _stop(self, action: policy.Stop) -> None:
        assert self.scoreboard is not None
        worker = action.worker
        log.info("stopping worker %d (pid %d): %s", worker.number, worker.pid, action.reason)
        plan = self.plans.get(worker.generation, self.plan)
        current = {id(listener.sock) for listener in self.plan.listeners}
        removed = sum(1 << i for i, listener in enumerate(plan.listeners) if id(listener.sock) not in current)
        deadline = time.monotonic() + self.pool.config.graceful_timeout
        self.scoreboard.request_stop(worker.slot, action.mode, deadline, removed)
        self._signal_worker(worker, signal.SIGTERM)

    def _kill(self, action: policy.Kill) -> None:
        worker = action.worker
        level = logging.ERROR if action.signum in (signal.SIGABRT, signal.SIGKILL) else logging.INFO
        log.log(level, "sending SIG%s to worker %d (pid %d): %s", signal_name(action.signum),
                worker.number, worker.pid, action.reason)
        child = self.handles.get(worker.pid)
        if child is not None and action.signum == signal.SIGABRT:
            child.abort()
        elif child is not None:
            child.send(action.signum)

    def _signal_worker(self, worker: policy.WorkerRecord, signum: int) -> None:
        child = self.handles.get(worker.pid)
        if child is not None:
            child.send(signum)

    def _kill_workers(self) -> None:
        """On the way out: SIGKILL to every worker left, each reaped (for FAST_STOP_GRACE at most)."""
        stop_all(self.handles.values(), policy.FAST_STOP_GRACE, signal.SIGKILL)
        self.handles = {pid: child for pid, child in self.handles.items() if not child.reaped}

    def _notify(self, action: policy.Notify) -> None:
        stats = self.pool.statistics()
        text = f"{stats['ready']} workers ready, generation {stats['generation']}"
        if action.event == "ready":
            log.info("ready: %s", text)
            self._call_hook("when_ready", self)
            self._finish_upgrade()
        elif action.event == "cancelled":
            self._cancel_reload(action.reason)
            text = "reload cancelled"
        else:
            log.info("reloaded: %s", text)
            self._previous_plan = self.plan
            self._forget_finished_plans()
            self._report(RELOADED, self.plan)
        notify.ready(text)

    # -- signal handlers -------------------------------------------------------------------------

    def handle_term(self) -> None:
        """SIGTERM: graceful stop. No new work; what is in flight and what waits in the listen
        backlog is served; SIGKILL for what is left after graceful_timeout. After an upgrade
        hand-over the workers only finish what they hold: the new master serves the listeners."""
        if self.upgrade is not None:
            self.handed_over = True  # the new master serves our sockets now: leave them be
            # Sent by us, the current main process, so it counts under NotifyAccess=main too;
            # no STOPPING after it: the service is not stopping, only this process is.
            notify.mainpid(self.upgrade.pid)
        else:
            notify.stopping()
        self._execute(self.pool.stop(time.monotonic(), fast=False, reason="SIGTERM: graceful stop",
                                     handover=self.handed_over))
        self._close_listeners()

    def handle_int(self) -> None:
        """SIGINT and SIGQUIT: fast stop. Workers get SIGQUIT and leave at once (SIGKILL after 2 s)."""
        notify.stopping()
        self._execute(self.pool.stop(time.monotonic(), fast=True, reason="fast stop"))
        self._close_listeners()

    def _close_listeners(self) -> None:
        """Stopping: give up the master's copies of the listeners now, not at exit.

        The workers still hold theirs and serve what is queued; when the last of them closes, the
        listener is gone at once, instead of accepting connections into a backlog that nobody
        drains any more while the master waits for its workers. A Unix socket file is removed
        now, so new clients are refused instead of queued (unless a new master took it over).
        """
        for listener in self._sockets.values():
            listener.close(unlink=not self.handed_over)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        """SIGHUP: reload. The whole configuration is read again and a new generation of workers
        is built from it, each new worker accepting before an old one stops. A configuration
        that cannot be applied is refused, naming why, and the running one stays."""
        notify.reloading()
        self.reload_seq += 1
        if self.pool.stopping:
            self._report(REFUSED, error="the master is stopping", exit_code=EXIT_FAILURE)
            return
        old = self.plan
        try:
            plan = self.replan(old) if self.replan is not None else dataclasses.replace(old, changes=(), held=())
            self._switch(old, plan)
        except PreforkError as exc:
            self.reloads_refused += 1
            log.error("reload refused, keeping the running configuration: %s", exc)
            self._report(REFUSED, error=str(exc), exit_code=exc.exit_code)
            notify.ready("reload refused")
            return
        for line in plan.changes:
            log.info("reload: %s", line)
        for line in plan.held:
            log.warning("reload: not applied: %s", line)
        self._previous_plan = old
        self.plans[self.pool.generation + 1] = plan
        self._execute(self.pool.reload(time.monotonic(), policy.PoolConfig.from_settings(plan.settings)))
        self._report(STARTED, plan)

    def _switch(self, old: Plan, new: Plan) -> None:
        """Make *new* the current plan on the master's side; PreforkError leaves *old* in place."""
        self._take_listeners(new)
        try:
            if new.enter is not None:
                new.enter()
            self.plan = new
            self._sync_metrics(old)
        except PreforkError:
            self.plan = old
            if old.enter is not None:
                old.enter()
            if new.spec.access_log is not None and new.spec.access_log is not old.spec.access_log:
                new.spec.access_log.close()
            self._forget_finished_plans()  # closes the listeners only the refused plan had bound
            raise

    def _cancel_reload(self, reason: str) -> None:
        """The new generation could not start: the plan before it is the current one again."""
        failed, self.plan = self.plan, self._previous_plan
        self.plans[self.pool.generation] = self.plan
        log.error("reload cancelled: %s; generation %d keeps serving with the configuration it had",
                  reason, min(w.generation for w in self.pool.workers.values()) if self.pool.workers else 0)
        if self.plan.enter is not None:
            self.plan.enter()
        self._sync_metrics(failed)
        self._forget_finished_plans()
        self._report(CANCELLED, failed, error=reason, exit_code=EXIT_APP_LOAD)

    def _take_listeners(self, plan: Plan) -> None:
        """Hold *plan*'s listeners; give each its scoreboard counter (kept across reloads)."""
        for listener in plan.listeners:
            self._sockets.setdefault(id(listener.sock), listener)
            if listener.name not in self.counter_names:
                self.counter_names.append(listener.name)
        plan.spec.counter_indexes = [self.counter_names.index(listener.name) for listener in plan.listeners]

    def _forget_finished_plans(self) -> None:
        """Drop the plans no worker runs any more; close the listeners and logs only they had."""
        before = self._plans_seen()
        generations = {w.generation for w in self.pool.workers.values()} | {self.pool.generation}
        self.plans = {g: plan for g, plan in self.plans.items() if g in generations}
        kept = self._plans_seen()
        held = {id(listener.sock) for plan in kept for listener in plan.listeners}
        for key, listener in list(self._sockets.items()):
            if key not in held:
                del self._sockets[key]
                listener.close(unlink=not self.handed_over)
                log.info("closed listener %s: the configuration no longer has it", listener.name)
        logs = {id(plan.spec.access_log) for plan in kept}
        for plan in before:
            if plan.spec.access_log is not None and id(plan.spec.access_log) not in logs:
                plan.spec.access_log.close()

    def _plans_seen(self) -> list[Plan]:
        """The plans the master still needs: the current one, the one a reload in flight may go
        back to, and those of living workers."""
        return [self.plan, self._previous_plan, *self.plans.values()]

    def _report(self, outcome: str, plan: Plan | None = None, error: str = "", exit_code: int = 0) -> None:
        """Say how the reload went in PIDFILE.reload, for `prefork reload`."""
        if self.pidfile is None:
            return
        report = ReloadReport(self.reload_seq, self.pid, outcome, self.pool.generation,
                              plan.changes if plan else (), plan.held if plan else (), error, exit_code)
        try:
            write_report(report_path(self.pidfile.path), report)
        except OSError as exc:
            log.error("cannot write %s: %s", report_path(self.pidfile.path), exc.strerror)

    def handle_ttin(self) -> None:
        """SIGTTIN: one worker more."""
        self._execute(self.pool.scale(time.monotonic(), self.pool.target + 1))

    def handle_ttou(self) -> None:
        """SIGTTOU: one worker fewer, never below one."""
        self._execute(self.pool.scale(time.monotonic(), max(1, self.pool.target - 1)))

    def handle_winch(self) -> None:
        """SIGWINCH: stop the workers gracefully, keep the master and its listeners (not when the
        master runs in a terminal, which sends WINCH on every resize)."""
        if sys.stdin is not None and sys.stdin.isatty():
            # A terminal sends WINCH on every resize; stopping all workers for that would
            # surprise anyone running the master in the foreground.
            log.info("SIGWINCH ignored: the master runs in a terminal")
            return
        self._execute(self.pool.scale(time.monotonic(), 0))

    def handle_usr1(self) -> None:
        """SIGUSR1: reopen the log files, here and (passed on) in every worker and the metrics process."""
        if self.spec.on_reopen_logs is not None:
            self.spec.on_reopen_logs()
        for child in [*self.handles.values(), *filter(None, [self.metrics])]:
            child.send(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """SIGUSR2: upgrade in place: start a new master (same command line) on the same sockets;
        it stops us once its workers accept."""
        if self.upgrade is not None:
            log.warning("upgrade already in progress (new master %d)", self.upgrade.pid)
            return
        env = {**os.environ, **inherit_env(self.listeners), UPGRADE_PARENT_ENV: str(self.pid)}
        argv = [sys.executable, *sys.orig_argv[1:]]
        if not self._move_pidfile(f"{self.settings.pidfile}.oldbin"):
            return
        self.upgrade = Child.fork(lambda: _exec_new_master(argv, env))
        for listener in self.listeners:
            os.set_inheritable(listener.fileno(), False)  # only the new master was to inherit them
        log.info("upgrade: new master %d started: %s", self.upgrade.pid, " ".join(argv))

    def handle_chld(self) -> None:
        """SIGCHLD: nothing here; children are reaped on every turn of the loop."""

    # -- upgrade ---------------------------------------------------------------------------------

    def _finish_upgrade(self) -> None:
        """In a master started by USR2: our workers accept, so the old master can go."""
        old = self.upgrade_parent
        self.upgrade_parent = 0
        if not old or os.getppid() != old:
            return  # not an upgrade, or the old master is already gone
        notify.mainpid(self.pid)  # the service manager must follow us before the old one leaves
        log.info("upgrade: taking over from master %d", old)
        send_signal(old, signal.SIGTERM)  # our parent, not a child: no handle

    def _upgrade_failed(self, code: int) -> None:
        self.upgrade = None
        self._move_pidfile(self.settings.pidfile)
        log.error("upgrade failed: the new master exited with status %d; this master keeps serving", code)

    def _move_pidfile(self, path: str | None) -> bool:
        """Move our pidfile to *path* (upgrade bookkeeping); False, logged, if that is refused."""
        if self.pidfile is None or not path:
            return True
        try:
            self.pidfile.rename(path)
        except PidfileError as exc:
            log.error("upgrade refused: %s", exc)
            return False
        return True

    # -- the metrics process -----------------------------------------------------------------

    def _sync_metrics(self, old: Plan) -> None:
        """After a change of plan: restart the metrics process if what it serves has changed.

        A new address that cannot be bound raises ListenerError (the reload is refused, and the
        process of the running configuration is started again on its address).
        """
        wanted: MetricsServes = (self.settings.metrics_bind, self.spec.name, tuple(self.counter_names))
        if wanted == self._metrics_serves and (self.metrics is not None or self._metrics_due):
            return
        self._stop_metrics()
        try:
            self._start_metrics(wait=True)
        except PreforkError:
            self._metrics_due = time.monotonic() + METRICS_RESTART_DELAY  # the running plan's, again
            raise

    def _start_metrics(self, wait: bool) -> None:
        """Fork the process that serves metrics_bind from the scoreboard.

        At start (*wait*), the master waits until it listens, so that a port that cannot be
        bound stops the service with exit code 4 instead of failing quietly.
        """
        bind = self.settings.metrics_bind
        self._metrics_due = 0.0
        self._metrics_serves = (bind, self.spec.name, tuple(self.counter_names))
        if not bind:
            return
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self.metrics = Child.fork(lambda: self._run_metrics(bind, write_fd, read_fd))
        os.close(write_fd)
        try:
            report = read_start_report(read_fd, METRICS_START_TIMEOUT) if wait else b"ok"
        finally:
            os.close(read_fd)
        if report != b"ok":
            self._stop_metrics()
            raise ListenerError(bind, report.decode(errors="replace") or "the metrics process did not start")

    def _run_metrics(self, bind: str, report_fd: int, parent_fd: int) -> None:
        """Called in the metrics child. Never returns."""
        code = 1
        try:
            os.close(parent_fd)  # the master's end of the report pipe
            if self.signals is not None:
                self.signals.forget()
            reset_to_defaults(MASTER_SIGNALS)
            for listener in self._sockets.values():
                listener.sock.close()  # this process serves no traffic and must not hold the ports
            set_title("metrics", self.spec.name)
            from prefork import metrics  # only here: it brings in an HTTP server the rest never needs

            assert self.scoreboard is not None
            metrics.run(bind, self.scoreboard, list(self.counter_names), self.spec.name,
                        drop_privileges=self.spec.drop_privileges,
                        ready=lambda address: _metrics_ready(report_fd, address))
            code = 0
        except PreforkError as exc:
            send_start_report(report_fd, str(exc).encode())
            code = exc.exit_code
        except BaseException:
            log.exception("metrics process failed")
        finally:
            flush_std_streams()
            os._exit(code)

    def _metrics_exited(self, code: int) -> None:
        self.metrics = None
        if self.pool.stopping or self._exit is not None:
            return
        log.warning("metrics process exited (status %d); restarting it in %.0f s", code, METRICS_RESTART_DELAY)
        self._metrics_due = time.monotonic() + METRICS_RESTART_DELAY

    def _stop_metrics(self) -> None:
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.stop(policy.FAST_STOP_GRACE)

    # -- end -------------------------------------------------------------------------------------

    def _cleanup(self) -> None:
        self._kill_workers()
        self._stop_metrics()
        for listener in self._sockets.values():
            listener.close(unlink=not self.handed_over)
        if self.scoreboard is not None:
            self.scoreboard.close()
        for fd in self._boot_errors:
            os.close(fd)
        self._boot_errors = ()
        if self.pidfile is not None:
            self.pidfile.remove()
        self._exit = self._exit or policy.Halt(EXIT_OK, "stopped")
        log.info("master %d exiting: %s", self.pid, self._exit.reason)

    def _read_boot_messages(self) -> None:
        """Take what workers wrote on the boot-error pipe ("PID:message", NUL-terminated)."""
        while self._boot_errors:
            try:
                data = os.read(self._boot_errors[0], 65536)
            except BlockingIOError:
                return  # nothing more was said
            for record in filter(None, data.split(b"\0")):
                pid, _, message = record.decode(errors="replace").partition(":")
                if pid.isdigit():
                    self._boot_messages[int(pid)] = message

    def _scoreboard_path(self) -> str | None:
        """Beside the pidfile (for `prefork status`); a temporary file if only metrics read it."""
        pidfile = self.settings.pidfile
        if pidfile:
            return f"{os.fspath(pidfile)}.scoreboard"
        if self.settings.metrics_bind:
            return os.path.join(tempfile.gettempdir(), f"prefork-{self.pid}.scoreboard")
        return None

    def _call_hook(self, name: str, *args: Any, plan: Plan | None = None) -> None:
        hook = getattr((plan or self.plan).hooks, name)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("hook %s failed", name)


def queue_depth(listener: Listener | None) -> int:
    """Connections waiting in *listener*'s accept queue, as ``ss -lnt`` / ``ss -lx`` show it
    (Recv-Q); NO_DEPTH for a listener gone, a datagram one, a reuse_port one (each worker has
    its own queue), or where the kernel does not tell."""
    if listener is None or not listener.is_stream or listener.reuses_port:
        return NO_DEPTH
    if listener.sock.family == socket.AF_UNIX:
        depth = unix_accept_queue_length(listener.sock)
    else:
        depth = accept_queue_length(listener.sock)
    return NO_DEPTH if depth is None else depth


def _metrics_ready(report_fd: int, address: tuple[str, int]) -> None:
    log.info("metrics on http://%s:%d/metrics", *address)
    send_start_report(report_fd, b"ok")


def _exec_new_master(argv: list[str], env: dict[str, str]) -> None:
    """Called in the child of an upgrade: become the new master. Never returns."""
    try:
        reset_to_defaults(MASTER_SIGNALS)
        os.execve(argv[0], argv, env)
    except BaseException:
        os.write(2, f"prefork: cannot start the new master {argv}\n".encode())
    finally:
        os._exit(127)
