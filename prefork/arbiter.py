"""The master's loop: fork, reap, signal and wait, on behalf of the pool policy. Runs in: master.

Rules:

1. This is the only module that calls ``os.fork``, ``os.kill`` and ``os.waitpid`` for workers.
   It decides nothing itself: events go to ``prefork.pool.Pool`` and its actions are carried out.
2. Single-threaded. Signal handlers only record (``prefork.signals``); the loop wakes on the
   signal pipe and dispatches to ``handle_<name>()``.
3. The master is never on the request path: it wakes for signals, child exits and a tick.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import resource
import select
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from prefork import notify, pool as policy
from prefork.errors import EXIT_APP_LOAD, EXIT_FAILURE, EXIT_OK, ConfigError, ListenerError, PidfileError, PreforkError
from prefork.handover import UPGRADE_PARENT_ENV, upgrade_parent  # the variable: set by USR2, names the old master
from prefork.listeners import inherit_env
from prefork.pidfile import Pidfile
from prefork.procstats import rss
from prefork.proctitle import set_title
from prefork.scoreboard import Scoreboard
from prefork.signals import MASTER_SIGNALS, SignalQueue, reset_to_defaults, signal_name
from prefork.worker import WorkerIdentity, WorkerSpec, flush_std_streams, run_worker

__all__ = ["Arbiter", "Hooks", "UPGRADE_PARENT_ENV"]

log = logging.getLogger("prefork.master")

# Slots in the scoreboard: the most workers one master can run at once (surge included).
SCOREBOARD_CAPACITY = 1024
# How often worker memory is read for max_worker_memory (a /proc read per worker).
MEMORY_CHECK_INTERVAL = 1.0
# The metrics process gets this long to listen at start; a crashed one is restarted after this.
METRICS_START_TIMEOUT = 10.0
METRICS_RESTART_DELAY = 1.0
# On the way out, how often a child that was told to leave is looked for (a short, bounded wait).
_REAP_POLL = 0.01


@dataclasses.dataclass
class Hooks:
    """User callables; each is called with the arbiter (and the worker record where relevant)."""

    on_starting: Callable[..., Any] | None = None
    when_ready: Callable[..., Any] | None = None
    pre_fork: Callable[..., Any] | None = None
    post_fork: Callable[..., Any] | None = None
    worker_exit: Callable[..., Any] | None = None
    on_exit: Callable[..., Any] | None = None


class Arbiter:
    """Supervises the workers of one service until a stop signal; ``run()`` returns the exit code."""

    def __init__(self, settings: Any, listeners: Sequence[Any], worker_spec: WorkerSpec,
                 hooks: Hooks | None = None, reload_settings: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.listeners = list(listeners)
        self.spec = worker_spec
        self.hooks = hooks or Hooks()
        self.reload_settings = reload_settings
        self.pool = policy.Pool(policy.PoolConfig.from_settings(settings), SCOREBOARD_CAPACITY)
        self.pid = os.getpid()
        self.signals: SignalQueue | None = None
        self.scoreboard: Scoreboard | None = None
        self.pidfile: Pidfile | None = None
        self.upgrade_child = 0
        self.handed_over = False  # a new master took over: leave its sockets and pidfile alone
        self.metrics_pid = 0
        self.reloads_refused = 0
        self._metrics_due = 0.0  # when to restart a metrics process that died
        self.upgrade_parent = upgrade_parent(os.environ)  # ConfigError for a value that is no pid
        os.environ.pop(UPGRADE_PARENT_ENV, None)
        self._exit: policy.Halt | None = None
        self._boot_errors: tuple[int, ...] = ()  # pipe on which workers report why they cannot boot
        self._next_memory_check = 0.0

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
                self._kill_all(signal.SIGKILL)
            finally:
                self._cleanup()
        code = self._exit.exit_code if self._exit else EXIT_FAILURE
        self._call_hook("on_exit", self)
        return code

    def _start(self) -> None:
        self._boot_errors = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.spec.boot_error_fd = self._boot_errors[1]
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
        from prefork.servers import _Poller

        with _Poller() as poller:
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
        # Only our workers' slots: scanning the whole map each tick would cost for nothing.
        slots = {w.slot: self.scoreboard.read(w.slot) for w in self.pool.workers.values()}
        self._execute(self.pool.tick(now, slots, self._memory(now)))
        self._publish()
        if self._metrics_due and now >= self._metrics_due and not self.pool.stopping:
            self._start_metrics(wait=False)

    def _publish(self) -> None:
        assert self.scoreboard is not None
        pool = self.pool
        self.scoreboard.publish(pool.generation, pool.target, pool.restarts, self.reloads_refused,
                                pool.reload_failures)

    def _memory(self, now: float) -> dict[int, int] | None:
        if not self.settings.max_worker_memory or now < self._next_memory_check:
            return None
        self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        readings = {w.pid: rss(w.pid) for w in self.pool.workers.values() if w.pid}
        return {pid: value for pid, value in readings.items() if value is not None}

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._child_exited(pid, os.waitstatus_to_exitcode(status))

    def _child_exited(self, pid: int, code: int) -> None:
        if pid == self.metrics_pid:
            self._metrics_exited(code)
            return
        if pid == self.upgrade_child:
            self._upgrade_failed(code)
            return
        worker = self.pool.by_pid(pid)
        if worker is None:
            return  # a child of a hook, not a worker
        self._log_exit(worker, code)
        assert self.scoreboard is not None
        view = self.scoreboard.read(worker.slot)  # read before release: what it served
        served = view.requests if view.pid == pid else 0
        self.scoreboard.release(worker.slot)
        self._call_hook("worker_exit", self, worker)
        self._execute(self.pool.exited(pid, code, time.monotonic(), served))

    def _log_exit(self, worker: policy.WorkerRecord, code: int) -> None:
        how = f"killed by SIG{signal_name(-code)}" if code < 0 else f"exit status {code}"
        if worker.stopping or self.pool.stopping:
            log.info("worker %d (pid %d) stopped (%s)", worker.number, worker.pid, how)
        elif code == policy.WORKER_BOOT_FAILED:
            log.error("worker %d (pid %d) could not load the app", worker.number, worker.pid)
        else:
            log.warning("worker %d (pid %d) died unexpectedly (%s)", worker.number, worker.pid, how)

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
                self._notify(action.event)
            elif isinstance(action, policy.Halt) and self._exit is None:
                self._exit = action
                if action.exit_code == EXIT_APP_LOAD:
                    log.error("cannot load the app: %s", self._first_boot_error())

    def _spawn(self, worker: policy.WorkerRecord) -> None:
        assert self.scoreboard is not None
        self._call_hook("pre_fork", self, worker)
        self.scoreboard.claim(worker.slot, worker.number, worker.generation)
        flush_std_streams()
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot fork worker %d: %s", worker.number, exc)
            self.scoreboard.release(worker.slot)
            self.pool.spawn_failed(worker, time.monotonic())
            return
        if pid == 0:
            identity = WorkerIdentity(worker.number, worker.generation, self.scoreboard.writer(worker.slot))
            run_worker(self.spec, identity, self.signals)
        self.scoreboard.set_pid(worker.slot, pid)
        self.pool.spawned(worker, pid)
        log.debug("worker %d (pid %d) generation %d started", worker.number, pid, worker.generation)

    def _stop(self, action: policy.Stop) -> None:
        assert self.scoreboard is not None
        worker = action.worker
        log.info("stopping worker %d (pid %d): %s", worker.number, worker.pid, action.reason)
        self.scoreboard.request_stop(worker.slot, action.mode)
        self._signal(worker.pid, signal.SIGTERM)

    def _kill(self, action: policy.Kill) -> None:
        worker = action.worker
        level = logging.ERROR if action.signum in (signal.SIGABRT, signal.SIGKILL) else logging.INFO
        log.log(level, "sending SIG%s to worker %d (pid %d): %s", signal_name(action.signum),
                worker.number, worker.pid, action.reason)
        if action.signum == signal.SIGABRT:
            _no_core_dump(worker.pid)
        self._signal(worker.pid, action.signum)
        if action.signum == signal.SIGABRT:
            # A stopped worker (SIGSTOP, a debugger) cannot dump its traceback until it runs.
            self._signal(worker.pid, signal.SIGCONT)

    def _kill_all(self, signum: int) -> None:
        for worker in self.pool.workers.values():
            self._signal(worker.pid, signum)
        deadline = time.monotonic() + policy.FAST_STOP_GRACE
        for worker in list(self.pool.workers.values()):
            if _reap_before(worker.pid, deadline):
                del self.pool.workers[worker.slot]

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        if pid <= 0:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # it exited already; its exit is reaped in the loop

    def _notify(self, event: str) -> None:
        stats = self.pool.statistics()
        text = f"{stats['ready']} workers ready, generation {stats['generation']}"
        if event == "ready":
            log.info("ready: %s", text)
            self._call_hook("when_ready", self)
            self._finish_upgrade()
        else:
            log.info("reloaded: %s", text)
        notify.ready(text)

    # -- signal handlers -------------------------------------------------------------------------

    def handle_term(self) -> None:
        if self.upgrade_child:
            self.handed_over = True  # the new master serves our sockets now: leave them be
            # Sent by us, the current main process, so it counts under NotifyAccess=main too;
            # no STOPPING after it: the service is not stopping, only this process is.
            notify.mainpid(self.upgrade_child)
        else:
            notify.stopping()
        self._execute(self.pool.stop(time.monotonic(), fast=False, reason="SIGTERM: graceful stop",
                                     handover=self.handed_over))
        self._close_listeners()

    def handle_int(self) -> None:
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
        for listener in self.listeners:
            listener.close(unlink=not self.handed_over)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        notify.reloading()
        config = None
        if self.reload_settings is not None:
            try:
                self.settings = self.reload_settings()
            except ConfigError as exc:
                self.reloads_refused += 1
                log.error("reload refused, keeping the running configuration: %s", exc)
                notify.ready("reload refused")
                return
            config = policy.PoolConfig.from_settings(self.settings)
        self._execute(self.pool.reload(time.monotonic(), config))

    def handle_ttin(self) -> None:
        self._execute(self.pool.scale(time.monotonic(), self.pool.target + 1))

    def handle_ttou(self) -> None:
        self._execute(self.pool.scale(time.monotonic(), max(1, self.pool.target - 1)))

    def handle_winch(self) -> None:
        if sys.stdin is not None and sys.stdin.isatty():
            # A terminal sends WINCH on every resize; stopping all workers for that would
            # surprise anyone running the master in the foreground.
            log.info("SIGWINCH ignored: the master runs in a terminal")
            return
        self._execute(self.pool.scale(time.monotonic(), 0))

    def handle_usr1(self) -> None:
        if self.spec.on_reopen_logs is not None:
            self.spec.on_reopen_logs()
        for pid in [w.pid for w in self.pool.workers.values()] + [self.metrics_pid]:
            self._signal(pid, signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Upgrade in place: start a new master on the same sockets; it stops us once ready."""
        if self.upgrade_child:
            log.warning("upgrade already in progress (new master %d)", self.upgrade_child)
            return
        env = {**os.environ, **inherit_env(self.listeners), UPGRADE_PARENT_ENV: str(self.pid)}
        argv = [sys.executable, *sys.orig_argv[1:]]
        if not self._move_pidfile(f"{self.settings.pidfile}.oldbin"):
            return
        flush_std_streams()
        pid = os.fork()
        if pid == 0:
            _exec_new_master(argv, env)
        for listener in self.listeners:
            os.set_inheritable(listener.fileno(), False)  # only the new master was to inherit them
        self.upgrade_child = pid
        log.info("upgrade: new master %d started: %s", pid, " ".join(argv))

    def handle_chld(self) -> None:
        """Children are reaped on every turn of the loop."""

    # -- upgrade ---------------------------------------------------------------------------------

    def _finish_upgrade(self) -> None:
        """In a master started by USR2: our workers accept, so the old master can go."""
        old = self.upgrade_parent
        self.upgrade_parent = 0
        if not old or os.getppid() != old:
            return  # not an upgrade, or the old master is already gone
        notify.mainpid(self.pid)  # the service manager must follow us before the old one leaves
        log.info("upgrade: taking over from master %d", old)
        self._signal(old, signal.SIGTERM)

    def _upgrade_failed(self, code: int) -> None:
        self.upgrade_child = 0
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

    def _start_metrics(self, wait: bool) -> None:
        """Fork the process that serves metrics_bind from the scoreboard.

        At start (*wait*), the master waits until it listens, so that a port that cannot be
        bound stops the service with exit code 4 instead of failing quietly.
        """
        bind = getattr(self.settings, "metrics_bind", None)
        self._metrics_due = 0.0
        if not bind:
            return
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        flush_std_streams()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            self._run_metrics(bind, write_fd)
        os.close(write_fd)
        self.metrics_pid = pid
        try:
            report = _read_report(read_fd, METRICS_START_TIMEOUT) if wait else b"ok"
        finally:
            os.close(read_fd)
        if report != b"ok":
            raise ListenerError(bind, report.decode(errors="replace") or "the metrics process did not start")

    def _run_metrics(self, bind: str, report_fd: int) -> None:
        """Called in the metrics child. Never returns."""
        code = 1
        try:
            if self.signals is not None:
                self.signals.forget()
            reset_to_defaults(MASTER_SIGNALS)
            for listener in self.listeners:
                listener.sock.close()  # this process serves no traffic and must not hold the ports
            set_title("metrics", self.spec.name)
            from prefork import metrics  # only here: it brings in an HTTP server the rest never needs

            assert self.scoreboard is not None
            names = [listener.name for listener in self.listeners]
            metrics.run(bind, self.scoreboard, names, self.spec.name, drop_privileges=self.spec.drop_privileges,
                        ready=lambda address: _metrics_ready(report_fd, address))
            code = 0
        except PreforkError as exc:
            _write_report(report_fd, str(exc).encode())
            code = exc.exit_code
        except BaseException:
            log.exception("metrics process failed")
        finally:
            flush_std_streams()
            os._exit(code)

    def _metrics_exited(self, code: int) -> None:
        self.metrics_pid = 0
        if self.pool.stopping or self._exit is not None:
            return
        log.warning("metrics process exited (status %d); restarting it in %.0f s", code, METRICS_RESTART_DELAY)
        self._metrics_due = time.monotonic() + METRICS_RESTART_DELAY

    def _stop_metrics(self) -> None:
        pid, self.metrics_pid = self.metrics_pid, 0
        if not pid:
            return
        self._signal(pid, signal.SIGTERM)
        if not _reap_before(pid, time.monotonic() + policy.FAST_STOP_GRACE):
            self._signal(pid, signal.SIGKILL)
            _reap_before(pid, time.monotonic() + policy.FAST_STOP_GRACE)

    # -- end -------------------------------------------------------------------------------------

    def _cleanup(self) -> None:
        if self.pool.workers:
            self._kill_all(signal.SIGKILL)
        self._stop_metrics()
        for listener in self.listeners:
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

    def _first_boot_error(self) -> str:
        try:
            data = os.read(self._boot_errors[0], 65536) if self._boot_errors else b""
        except BlockingIOError:
            data = b""  # no worker said anything
        first = data.split(b"\0", 1)[0].decode(errors="replace")
        return first or "see the worker's log"

    def _scoreboard_path(self) -> str | None:
        """Beside the pidfile (for `prefork status`); a temporary file if only metrics read it."""
        pidfile = self.settings.pidfile
        if pidfile:
            return f"{os.fspath(pidfile)}.scoreboard"
        if getattr(self.settings, "metrics_bind", None):
            return os.path.join(tempfile.gettempdir(), f"prefork-{self.pid}.scoreboard")
        return None

    def _call_hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.hooks, name)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("hook %s failed", name)


def _reap_before(pid: int, deadline: float) -> bool:
    """Reap our child *pid* once it has exited, waiting until *deadline* at most.

    True when it is gone (also when something else reaped it already). Used only on the way
    out, where the loop that reaps on SIGCHLD no longer runs.
    """
    while pid > 0:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_REAP_POLL)
    return True


def _read_report(fd: int, timeout: float) -> bytes:
    """What a child writes on *fd* until it closes it (or *timeout* passes)."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            break
        data += chunk
    return data


def _metrics_ready(report_fd: int, address: tuple[str, int]) -> None:
    log.info("metrics on http://%s:%d/metrics", *address)
    _write_report(report_fd, b"ok")


def _write_report(fd: int, data: bytes) -> None:
    """Called in a child: say how starting went, once, and close."""
    try:
        os.write(fd, data)
        os.close(fd)
    except OSError:
        pass  # the master stopped listening (a restart it does not wait for)


def _no_core_dump(pid: int) -> None:
    """A worker aborted for a timeout dumps its tracebacks; a core file of it would only fill disks."""
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_CORE)
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, hard))
    except (OSError, AttributeError):
        pass  # gone already, not permitted, or not Linux: the system's core settings apply


def _exec_new_master(argv: list[str], env: dict[str, str]) -> None:
    """Called in the child of an upgrade: become the new master. Never returns."""
    try:
        reset_to_defaults(MASTER_SIGNALS)
        os.execve(argv[0], argv, env)
    except BaseException:
        os.write(2, f"prefork: cannot start the new master {argv}\n".encode())
    finally:
        os._exit(127)
