"""A worker's life, from the fork that made it to ``os._exit``. Runs in: worker.

Rules:

1. Everything here is called in the child, after fork. The child first makes sure it cannot
   outlive the master (PR_SET_PDEATHSIG, then a parent check), resets the master's signal
   handlers, drops privileges, and only then loads the app and serves.
2. The child leaves only through ``os._exit``: it must never return into the master's code.
   Exit status: 0 after a requested stop, WORKER_BOOT_FAILED when the app cannot be loaded,
   1 after an unexpected error (logged with its traceback). A worker that fails before it
   accepts (the app, a post_fork hook, the privilege drop) also tells the master why, in one
   line on the boot-error pipe, so that a crash loop's halt can name its cause.
3. One loop serves every listener of the service: it waits on all of them, on the signal
   pipe and on the connections that wait for their first message (prefork.parking), and after
   each turn reports to the scoreboard with plain memory writes. A listener with an allow-list
   refuses other clients in ``verify_request`` (prefork.allowlist).
4. On SIGTERM the worker finishes what it is serving; when the whole service stops it also
   serves the connections already queued on its listeners before it closes them, so none
   is reset. Waiting connections that complete their first message within DRAIN_PATIENCE are
   served too; the rest (idle or stalled clients) are closed. SIGQUIT and SIGINT stop it at once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import functools
import logging
import os
import select
import signal
import socket
import ssl
import sys
import time
import traceback
from typing import Any, Callable, NoReturn, Protocol, Sequence

from prefork.accounting import accept_queue_length, instrument
from prefork.allowlist import guard
from prefork.errors import AppLoadError
from prefork.listeners import Listener
from prefork.loader import locate
from prefork.log import AccessLog, error_stream
from prefork.bindspec import Network
from prefork.parking import FirstMessage, ParkingLot, Stage, defer_accept, parking_limit
from prefork.proxy import ProxyStage
from prefork.tls import HandshakeStage
from prefork.pool import WORKER_BOOT_FAILED
from prefork.privileges import denied, unreachable
from prefork.scoreboard import STOP_SHUTDOWN, SlotWriter
from prefork.servers import LoopServer, Poller, TCPServer
from prefork.signals import MASTER_SIGNALS, WORKER_SIGNALS, SignalQueue, reset_to_defaults

__all__ = ["WorkerSpec", "WorkerLoop", "run_worker", "flush_std_streams"]

log = logging.getLogger("prefork.worker")

# The worker's loop wakes at least this often to report liveness and check on its master.
TICK = 1.0
# A stopping worker takes at most this many requests from a listener whose queue length it
# cannot read (UDP, Unix sockets): about a full backlog (somaxconn's default is 4096).
DRAIN_LIMIT = 4096
_PR_SET_PDEATHSIG = 1
# Writes to a pipe up to this size are atomic (POSIX guarantees at least 512; Linux gives 4096).
_PIPE_BUF = getattr(select, "PIPE_BUF", 512)
# A stopping worker waits this long (within graceful_timeout) for its waiting connections to
# complete their first message: a client that has just connected sends within a round trip,
# and an idle one must not hold every stop for the whole graceful_timeout.
DRAIN_PATIENCE = 1.0


@dataclasses.dataclass
class WorkerSpec:
    """Everything a worker needs, prepared by the master before fork."""

    listeners: Sequence[Listener]
    build_servers: Callable[[Sequence[Listener]], list[LoopServer]]  # may raise AppLoadError
    name: str
    graceful_timeout: float
    master_pid: int
    reuse_port: bool = False
    rebind: Callable[[Listener], Listener] | None = None  # reuse_port: a new per-worker socket for a listener
    drop_privileges: Callable[[], None] | None = None
    post_fork: Callable[[Any], None] | None = None
    on_reopen_logs: Callable[[], None] | None = None
    set_title: Callable[[int, int], object] | None = None
    boot_error_fd: int = -1  # where a worker that cannot load the app says why (read by the master)
    app_target: str | None = None  # the app's 'module:attribute' when the worker imports it
    access_log: AccessLog | None = None  # opened by the master before fork
    read_timeout: float = 0.0
    # The scoreboard's per-listener counter of each listener (stable across reloads that add
    # or remove listeners); empty: the listener's position.
    counter_indexes: Sequence[int] = ()
    # The stages of ?proxy and ?tls listeners (prefork.parking rule 6): the context built by the
    # master (None: no listener has ?tls), the networks that may send a PROXY header (empty: any).
    tls_context: ssl.SSLContext | None = None
    proxy_allow: Sequence[Network] = ()
    handshake_timeout: float = 5.0
    # mode = "asyncio": builds the worker's event loop (prefork.aioworker), which loads the app
    # itself and serves in place of build_servers and the synchronous _Loop. Called in the worker.
    event_loop: Callable[[WorkerSpec, WorkerIdentity, Sequence[Listener]], WorkerLoop] | None = None


class WorkerLoop(Protocol):
    """A worker's loop over its listeners: the synchronous _Loop here, or an event loop.

    Either speaks to the master only through the worker's scoreboard slot (state, loop tick,
    requests begin and end); ``run()`` serves until a requested stop and returns the exit status.
    """

    def run(self) -> int: ...


@dataclasses.dataclass
class WorkerIdentity:
    number: int
    generation: int
    slot: SlotWriter
    stage: str = "starting"  # what the worker is doing until it accepts, for a boot error
    booted: bool = False  # it accepts: a failure from now on is no boot failure


def run_worker(spec: WorkerSpec, identity: WorkerIdentity, inherited_signals: SignalQueue | None,
               others: Sequence[socket.socket] = ()) -> NoReturn:
    """Called in the child right after fork. Never returns.

    *others* are the master's listeners that this worker does not serve (one a reload is
    adding or removing): closed at once, since a copy held here would keep such a listener
    open, queueing connections that no one accepts.
    """
    status = 1
    try:
        for sock in others:
            sock.close()
        status = _live(spec, identity, inherited_signals)
    except AppLoadError as exc:
        _report_boot_error(spec, str(exc))
        status = WORKER_BOOT_FAILED
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
        if not identity.booted:
            _report_boot_error(spec, f"sys.exit({exc.code!r}) before accepting")
    except BaseException as exc:
        log.critical("worker %d failed:\n%s", identity.number, traceback.format_exc())
        if not identity.booted:
            _report_boot_error(spec, f"{identity.stage}: {exc!r}")
    finally:
        if spec.access_log is not None:
            spec.access_log.flush()  # os._exit writes no buffers
        flush_std_streams()
        os._exit(status)


def _live(spec: WorkerSpec, identity: WorkerIdentity, inherited_signals: SignalQueue | None) -> int:
    _die_with_master(spec.master_pid)
    if inherited_signals is not None:
        inherited_signals.forget()
    reset_to_defaults(MASTER_SIGNALS)
    # On SIGABRT (the master's timeout) and on fatal signals, dump every thread's stack to the
    # error log, then die of the signal. Done in C, so it works while Python code is stuck.
    faulthandler.enable(file=error_stream(), all_threads=True)
    if spec.set_title is not None:
        spec.set_title(identity.number, identity.generation)
    # Rebind first: the kernel lets only sockets of the same user share a port.
    identity.stage = "binding its own SO_REUSEPORT sockets"
    listeners = [spec.rebind(l) for l in spec.listeners] if spec.reuse_port and spec.rebind else spec.listeners
    identity.stage = "dropping privileges"
    app_file = None
    if spec.drop_privileges is not None:
        app_file = locate(spec.app_target) if spec.app_target else None  # found while still root
        spec.drop_privileges()
    identity.stage = "post_fork hook failed"
    if spec.post_fork is not None:
        spec.post_fork(identity)
    identity.stage = "loading the app"
    if spec.event_loop is not None:
        return _run_event_loop(spec, identity, listeners)
    servers = _build_servers(spec, listeners, app_file)
    identity.stage = "starting to serve"
    with SignalQueue(WORKER_SIGNALS) as signals:
        return _Loop(spec, identity, servers, listeners, signals).run()


def _run_event_loop(spec: WorkerSpec, identity: WorkerIdentity, listeners: Sequence[Listener]) -> int:
    """mode = "asyncio": the event loop serves, with its own signal handlers (see prefork.aioworker)."""
    assert spec.event_loop is not None
    loop = spec.event_loop(spec, identity, listeners)
    identity.stage = "starting to serve"
    return loop.run()


def _build_servers(spec: WorkerSpec, listeners: Sequence[Listener], app_file: str | None) -> list[LoopServer]:
    """Load the app and wrap the listeners; if the worker's user cannot read the app, say so.

    An import that cannot read a directory says "no module named ...": the real cause is
    found by checking, as this user, the path to the file that root found before the drop.
    """
    try:
        return spec.build_servers(listeners)
    except AppLoadError as exc:
        reason = unreachable(app_file) if app_file else None
        if reason is None:
            raise
        raise AppLoadError(f"cannot load {spec.app_target!r}: " + denied(
            reason, f"the app's module {app_file}", "make the app readable by that user")) from exc


def _report_boot_error(spec: WorkerSpec, message: str) -> None:
    """Hand the reason to the master, which shows it once for the whole pool."""
    # One atomic write, "PID:message" NUL-terminated: messages of several workers never interleave.
    data = f"{os.getpid()}:{message}".encode(errors="replace")[: _PIPE_BUF - 1] + b"\0"
    try:
        os.write(spec.boot_error_fd, data)
    except OSError:
        log.error("worker %d cannot load the app: %s", os.getpid(), message)


def _die_with_master(master_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the master dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != master_pid:
        os._exit(0)  # the master died between fork and prctl: nobody supervises us


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed or broken stream: nothing more can be said through it


class _Loop:
    """The worker's one loop over all its servers."""

    def __init__(self, spec: WorkerSpec, identity: WorkerIdentity, servers: list[LoopServer],
                 listeners: Sequence[Listener], signals: SignalQueue) -> None:
        self.spec = spec
        self.identity = identity
        self.slot = identity.slot
        self.servers = servers
        self.signals = signals
        self.stopping = False
        self.by_fd: dict[int, LoopServer] = {}
        self.rules: dict[LoopServer, FirstMessage] = {}
        for index, (server, listener) in enumerate(zip(servers, listeners)):
            guard(server, listener.spec.allow, listener.name)  # first: the access log sees its refusals
            counter = spec.counter_indexes[index] if spec.counter_indexes else index
            instrument(server, self.slot, listener.name, counter, spec.access_log, spec.read_timeout)
            self.by_fd[server.fileno()] = server
            rule = _first_message(server, listener, spec.read_timeout, _stages(spec, listener),
                                  spec.handshake_timeout or None)
            if rule is not None:
                self.rules[server] = rule
        self.lot = ParkingLot(parking_limit()) if self.rules else None

    def run(self) -> int:
        with Poller() as poller:
            for fd, server in self.by_fd.items():
                server.prepare_listener()
                if _is_stream(server):
                    defer_accept(server.socket, server in self.rules)
                poller.add(fd, shared=not self.spec.reuse_port)
            poller.add(self.signals.fileno())
            if self.lot is not None:
                poller.add(self.lot.fileno())
            self.slot.booted(os.getpid())
            self.identity.booted = True
            self._serve(poller)
            self.slot.exiting()
            self._drain(poller)
        self._close()
        return 0

    def _serve(self, poller: Poller) -> None:
        servers, slot = self.servers, self.slot
        takers = {fd: self._taker(server) for fd, server in self.by_fd.items()}  # one call per ready listener
        master_pid = self.spec.master_pid
        access = self.spec.access_log
        interrupted = self.signals.has_pending  # a signal ends a batch of queued requests
        lot = self.lot
        timeout = TICK
        while not self.stopping:
            ready = poller.wait(timeout)
            for fd in ready:
                take = takers.get(fd)
                if take is not None:
                    take(interrupted)
                elif lot is not None and fd == lot.fileno():
                    lot.collect()
                else:
                    self._handle_signals()
            timeout = TICK
            if lot:  # only while connections wait: an empty lot costs a turn nothing (UDP, spoken clients)
                lot.serve(interrupted)
                lot.expire()
                timeout = 0 if lot.has_ready else TICK
            for server in servers:
                server.service_actions()
            slot.tick()
            if not ready and access is not None:
                access.flush()  # idle: write what the busy turns buffered
            # PR_SET_PDEATHSIG covers a busy worker; the check on idle turns covers the rest
            # (a kernel without it) at no cost per request.
            if not ready and os.getppid() != master_pid:
                log.warning("worker %d: master %d is gone, leaving", os.getpid(), master_pid)
                self.stopping = True

    def _taker(self, server: LoopServer) -> Callable[[Callable[[], bool]], object]:
        """What the loop calls when *server*'s listener is ready: the lot's take, or the server's own loop."""
        rule = self._parked_rule(server)
        if rule is not None and self.lot is not None:
            return functools.partial(self.lot.take, server, rule)
        return server.serve_ready

    def _take_one(self, server: LoopServer) -> bool:
        """Take one request from *server*'s ready listener (a drain); True if there was one."""
        rule = self._parked_rule(server)
        if rule is not None and self.lot is not None:
            return self.lot.take(server, rule, _never, batch=1) > 0
        return _serve_one(server)

    def _parked_rule(self, server: LoopServer) -> FirstMessage | None:
        """The first-message rule of *server*'s connections if they go through the lot; else None."""
        rule = self.rules.get(server)
        return rule if self.lot is not None and isinstance(server, TCPServer) else None

    def _handle_signals(self) -> None:
        for signum in self.signals.pop_all():
            if signum == signal.SIGTERM:
                self.stopping = True
            elif signum in (signal.SIGQUIT, signal.SIGINT):
                self._close()
                flush_std_streams()
                os._exit(0)
            elif signum == signal.SIGUSR1 and self.spec.on_reopen_logs is not None:
                self.spec.on_reopen_logs()

    def _drain(self, poller: Poller) -> None:
        """Serve what is already queued before leaving.

        When the whole service stops, the connections queued when the stop began are served
        (until the stop's deadline: graceful_timeout); later arrivals are not waited for. The
        same for the listeners a reload removed (the slot's drain mask): no successor serves
        them. When only this worker retires, one pass serves the connections whose wake-up
        this worker received, so another worker is not left sleeping on them.
        """
        mask = -1 if self.slot.stop_mode == STOP_SHUTDOWN else self.slot.drain_mask
        deadline = self.slot.stop_deadline or time.monotonic() + self.spec.graceful_timeout
        self._drain_queued(poller, deadline, mask)
        if self.lot is not None:
            self._drain_parked(self.lot, min(deadline, time.monotonic() + DRAIN_PATIENCE))

    def _drain_queued(self, poller: Poller, deadline: float, mask: int) -> None:
        """Serve what the listeners in *mask* (bit = index) have queued now, until *deadline*;
        from the others, one pass over the connections this worker was woken for."""
        # Only what is queued now: under steady load a listener is never empty, and serving
        # new arrivals would hold the stop open until graceful_timeout and its SIGKILL.
        budget = {server: queued_requests(server.socket) if mask >> index & 1 else 0
                  for index, server in enumerate(self.servers)}
        ready = poller.wait(0)
        for fd in ready:  # the one pass
            server = self.by_fd.get(fd)
            if server is not None and not budget[server]:
                self._take_one(server)
        while any(budget.values()) and time.monotonic() < deadline:
            served = False
            for fd in ready:
                server = self.by_fd.get(fd)
                if server is not None and budget[server] > 0 and self._take_one(server):
                    budget[server] -= 1
                    served = True
            if not served:
                return
            ready = poller.wait(0)

    @staticmethod
    def _drain_parked(lot: ParkingLot, deadline: float) -> None:
        """Serve the waiting connections that complete their first message by *deadline*."""
        while len(lot) and (left := deadline - time.monotonic()) > 0:
            lot.serve(_never)
            lot.collect(left)
        lot.serve(_never)

    def _close(self) -> None:
        if self.lot is not None:
            self.lot.close()
            self.lot = None
        for server in self.servers:
            try:
                server.server_close()
            except Exception:
                log.exception("worker %d: error while closing %r", os.getpid(), server)


def _first_message(server: LoopServer, listener: Listener, read_timeout: float, stages: tuple[Stage, ...],
                   stage_timeout: float | None) -> FirstMessage | None:
    """What *server*'s connections wait for before their handler; None if they do not wait."""
    if not listener.is_stream or not isinstance(server, TCPServer):
        if stages:
            raise AppLoadError(f"{listener.name}: ?proxy and ?tls need a stream server built on TCPServer, "
                               f"not {type(server).__name__}")
        return None  # datagrams, and servers without take_request()
    return FirstMessage.of(server.RequestHandlerClass, listener.spec.server_first, read_timeout, stages,
                           stage_timeout)


def _stages(spec: WorkerSpec, listener: Listener) -> tuple[Stage, ...]:
    """The PROXY header, then the TLS handshake, as the listener's spec asks (prefork.parking rule 6)."""
    stages: list[Stage] = []
    if listener.spec.proxy:
        stages.append(ProxyStage(listener.spec.proxy, spec.proxy_allow))
    if listener.spec.tls:
        assert spec.tls_context is not None, "the master builds the context for every ?tls listener"
        stages.append(HandshakeStage(spec.tls_context))
    return tuple(stages)


def _is_stream(server: LoopServer) -> bool:
    sock = getattr(server, "socket", None)
    return isinstance(sock, socket.socket) and sock.type == socket.SOCK_STREAM


def _serve_one(server: LoopServer) -> bool:
    """Serve one request from *server*'s ready listener; False if there was none to take."""
    taken = server.take_request()
    if taken is None:
        return False
    server.dispatch_request(*taken)
    return True


def _never() -> bool:
    return False


def queued_requests(sock: socket.socket) -> int:
    """How many connections wait in *sock*'s accept queue now; DRAIN_LIMIT where unknown.

    Linux reports a TCP listener's queue length as tcpi_unacked of TCP_INFO. Other listeners
    (UDP, Unix sockets) cannot say, so at most DRAIN_LIMIT requests are taken from them.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        queued = accept_queue_length(sock)
        if queued is not None:
            return queued
    return DRAIN_LIMIT
