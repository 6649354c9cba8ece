"""mode = "asyncio": a worker's one event loop over all its listeners. Runs in: worker.

Rules:

1. Built and run in the child by ``prefork.worker`` (``WorkerSpec.event_loop``), after all that
   precedes serving there: death with the master, signals reset, privileges dropped. One loop
   (asyncio's, or uvloop's) serves every listener with the sockets the master bound:
   ``create_server(sock=)`` for stream listeners, ``create_datagram_endpoint(sock=)`` for
   datagram ones. The app's handlers are found by ``prefork.master`` (see ``prefork.aio``).
   A ``?proxy`` or ``?tls`` listener's connections are accepted by the worker and pass their
   stages, the PROXY header and the TLS handshake, before their protocol is made
   (``prefork.aiostages``).
2. It speaks to the master only through its scoreboard slot, as the synchronous loop does.
   Every TICK the loop writes ``turned()``: BUSY while it holds connections or running
   handlers, with the turn as the "current request". Each connection (stream) or datagram
   served counts one request (``max_requests`` counts those) and is timed into the listener's
   latency histogram: a connection's whole life, from its handler's start to its close, or a
   datagram's handling. Both are counted in the worker's own memory (a ``Tally``) and added to
   the slot on each tick, at the stop and at a QUIT, not per request; open connections are the
   slot's ``active``.
3. The slot says an event loop serves (``event_loop``) from boot until the loop ends, so the
   master judges the worker by its tick, busy or idle: whatever blocks the loop (a handler's
   time.sleep, CPU-bound code in a callback or a background task, with or without a
   connection open) stops the turns, and after ``timeout`` the master aborts the worker
   (SIGABRT, and faulthandler dumps every thread's stack), as a hung synchronous request.
   Before that, the watchdog thread logs which task or callback blocks the loop, with the main
   thread's stack, and names its client (if a connection's) in the slot, where the master's
   abort line reads it; the name is cleared when the loop turns again.
4. Signals: TERM stops accepting; on a stop of the whole service (or for listeners a reload
   removed) the connections and datagrams already queued on the listeners are served; open
   connections may finish until CANCEL_MARGIN before the stop's deadline (the master's
   SIGKILL), then their handlers are cancelled. QUIT and INT leave at once; USR1 reopens logs.
5. A handler's exception is logged with its traceback and its connection closed; the worker
   goes on. A connection silent both ways for ``idle_timeout`` seconds is closed (aborted if
   what it has to send waits for a peer that does not read). Silence is seen by the tick, not
   timed per message: a connection whose byte counts have not moved since a tick at least
   ``idle_timeout`` ago is idle.
6. Running out of descriptors is never silent and never a flood: at most one line per
   RESOURCE_REPORT_INTERVAL, with a count of the rest (``_OutOfFiles``). asyncio's loop reports
   each accept() that fails to the loop's exception handler (a traceback per retry); uvloop
   closes the connections it cannot take without a word, so the tick counts the worker's open
   descriptors when its connections come near its limit.
7. Per message, prefork adds to an app's own Protocol only a frame that catches its exception;
   it counts the bytes in and out (a wrapper around the transport the app writes to) only
   where something reads the counts: the access log, or ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from bisect import bisect_left
from typing import Any, Callable, Sequence, cast

from prefork.accounting import client_text, tls_text
from prefork.aio import DATAGRAM, AsyncStreamRequestHandler, Endpoint, async_kind
from prefork.aiostages import Acceptor, Stages, quiet_tls_errors
from prefork.allowlist import guard
from prefork.errors import AppLoadError
from prefork.latency import BUCKETS, LATENCY_BOUNDS
from prefork.listeners import Listener
from prefork.parking import ACCEPT_BATCH, Report
from prefork.ratelimit import RateLimit
from prefork.scoreboard import MAX_LISTENERS, STOP_SHUTDOWN, Tally
from prefork.servers import RESOURCE_ERRNOS
from prefork.worker import (DRAIN_LIMIT, DRAIN_PATIENCE, WorkerIdentity, WorkerSpec, flush_std_streams,
                            queued_requests)

__all__ = ["LoopOptions", "EventLoopWorker", "event_loop_factory", "new_event_loop"]

log = logging.getLogger("prefork.worker")

# Seconds between two turned() writes: the age of the master's "current request" while the
# loop runs freely. Small beside any sensible timeout; a memory store and a timer each time.
TICK = 0.25
# The watchdog looks at the loop this often (a thread that sleeps on an Event in between).
WATCH_INTERVAL = 0.25
# A loop late by this much is reported by the watchdog (by half the master's timeout if that
# is shorter, so the report comes before the abort).
BLOCKED_REPORT = 1.0
# Open connections are cancelled this long before the stop's deadline, when the master's
# SIGKILL comes: time for the handlers' cleanup and the access log.
CANCEL_MARGIN = 0.5
# Turns of the loop a stopping worker lets pass after closing its servers: asyncio's loop makes a
# connection it accepted in two more turns (a task creates its transport, which then calls
# connection_made()), uvloop's in one; from then on the connection is counted and waited for.
SETTLE_TURNS = 4
# A stopping worker whose open connections are Protocols looks at them this often.
STOP_POLL = 0.05
# How long cancelled handlers get to finish.
CANCEL_GRACE = 0.25
# A StreamReader buffers at most this much before a readline() fails (asyncio's default).
STREAM_LIMIT = 64 * 1024
# The watchdog's report shows this many of the innermost frames of the blocked thread.
STACK_FRAMES = 12
# The largest datagram read while draining a datagram listener (the largest UDP payload fits).
MAX_DATAGRAM = 65536
# Rule 6: at most one line about running out of descriptors per this many seconds.
RESOURCE_REPORT_INTERVAL = 5.0
# Rule 6: the tick counts the open descriptors only while the connections are at least this
# share of the limit (a comparison per tick; a directory read only near the limit), and reports
# when fewer than FD_HEADROOM are left (libuv keeps one in reserve to refuse connections with).
FD_COUNT_FROM = 0.5
FD_HEADROOM = 8
_monotonic = time.monotonic  # the clock of the per-request paths, one lookup less each time
# Most requests of an event loop fall in the first latency bucket: no bisect for those.
FIRST_BOUND = LATENCY_BOUNDS[0]


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """The settings an event-loop worker takes, besides its WorkerSpec."""

    loop: str = "auto"  # auto | asyncio | uvloop
    idle_timeout: float = 0.0
    timeout: float = 0.0  # the master's request timeout: the watchdog reports before it
    backlog: int = 0  # the listeners' backlog (0: as large as the OS allows)


def event_loop_factory(handlers: Callable[[Sequence[Listener]], list[Any]], options: LoopOptions
                       ) -> Callable[[WorkerSpec, WorkerIdentity, Sequence[Listener]], EventLoopWorker]:
    """What WorkerSpec.event_loop holds: called in the worker, it loads the app's handlers
    (*handlers* raises AppLoadError when the app has none for a listener) and builds the loop."""
    def make(spec: WorkerSpec, identity: WorkerIdentity, listeners: Sequence[Listener]) -> EventLoopWorker:
        return EventLoopWorker(spec, identity, listeners, handlers(listeners), options)
    return make


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """A new loop of the kind *choice* names: uvloop's for uvloop, and for auto if it is installed."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]  # an optional extra
        except ImportError:
            if choice == "uvloop":
                raise AppLoadError("loop = uvloop, but uvloop is not installed: pip install 'prefork[uvloop]'") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class EventLoopWorker:
    """The worker's event loop: the asyncio counterpart of prefork.worker's synchronous loop."""

    def __init__(self, spec: WorkerSpec, identity: WorkerIdentity, listeners: Sequence[Listener],
                 handlers: list[Any], options: LoopOptions) -> None:
        self.spec = spec
        self.identity = identity
        self.slot = identity.slot
        self.options = options
        self.access = spec.access_log
        # What the stages of ?proxy and ?tls listeners refuse: one rate-limited report per worker.
        self.stage_report = Report(time.monotonic)
        # Rule 7: whether stream connections count their bytes (someone reads the counts).
        self.counting = self.access is not None or options.idle_timeout > 0
        self.pid = os.getpid()
        self.endpoints = [_endpoint(self, listener, index, handler, spec)
                          for index, (listener, handler) in enumerate(zip(listeners, handlers))]
        self.tasks: dict[asyncio.Task[None], _Connection | None] = {}  # running handlers, each with its connection
        self.connections: set[_Connection | _ProtocolConnection] = set()  # open stream connections
        self.unmade = 0  # connections accepted whose connection_made() has not come yet
        self.busy = False
        self.turned_at = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_requested: asyncio.Future[None] | None = None
        self.main_thread = threading.get_ident()
        self.out_of_files = _OutOfFiles(self.pid)
        self.tally = Tally()  # requests and their latency, added to the slot on each tick

    def run(self) -> int:
        """Serve until TERM; 0 after a requested stop."""
        loop = new_event_loop(self.options.loop)
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main(loop))
        finally:
            self.slot.event_loop(False)  # what follows (exit hooks) is no loop's turn: not timed by the tick
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> int:
        self.loop = loop
        self.stop_requested = loop.create_future()
        loop.set_exception_handler(self.out_of_files.exception_handler(loop.get_exception_handler()))
        for signum, action in ((signal.SIGTERM, self.stop), (signal.SIGQUIT, _leave_now), (signal.SIGINT, _leave_now),
                               (signal.SIGUSR1, self._reopen_logs)):
            loop.add_signal_handler(signum, action, *((self,) if action is _leave_now else ()))
        for endpoint in self.endpoints:
            await endpoint.start(loop)
        self.slot.booted(self.pid)
        self.slot.event_loop(True)  # after booted(): the master never sees the flag with a boot-time tick
        self.identity.booted = True
        self._tick()
        watchdog = _Watchdog(self, _report_after(self.options.timeout))
        watchdog.start()
        try:
            await self.stop_requested
            self.slot.exiting()
            await self._finish()
        finally:
            watchdog.stop()
        return 0

    # -- what connections and handlers report ---------------------------------------------------

    def started(self, task: asyncio.Task[None] | None, connection: _Connection | _ProtocolConnection | None) -> None:
        if task is not None:
            self.tasks[task] = connection if isinstance(connection, _Connection) else None
        if connection is not None:
            self.connections.add(connection)
            self.slot.add_active(1)
        self.mark_busy()

    def mark_busy(self) -> None:
        """A handler runs now: the slot says BUSY from this turn, so a block is timed from here."""
        if not self.busy:
            self.busy = True
            self.slot.turned(True)

    def finished(self, task: asyncio.Task[None] | None, connection: _Connection | _ProtocolConnection | None) -> None:
        """A handler or connection is done (its request is counted by the endpoint's record())."""
        if task is not None:
            self.tasks.pop(task, None)
        if connection is not None:
            self.connections.discard(connection)
            self.slot.add_active(-1)

    def stop(self) -> None:
        """TERM: stop accepting and finish (see rule 4)."""
        if self.stop_requested is not None and not self.stop_requested.done():
            self.stop_requested.set_result(None)

    # -- the loop's own work --------------------------------------------------------------------

    def _tick(self) -> None:
        now = self.turned_at = time.monotonic()
        self.busy = bool(self.tasks or self.connections)
        self.slot.turned(self.busy)
        self.slot.add_tally(self.tally)
        if self.options.idle_timeout:
            self._close_idle(now)
        if self.access is not None:
            self.access.flush()  # at most a write per tick: lines never wait for an idle moment
        self.out_of_files.check(len(self.connections) + self.unmade)
        if os.getppid() != self.spec.master_pid:
            log.warning("worker %d: master %d is gone, leaving", self.pid, self.spec.master_pid)
            self.stop()
        assert self.loop is not None
        self.loop.call_later(TICK, self._tick)

    def _close_idle(self, now: float) -> None:
        """Rule 5: a connection's bytes that moved since the last tick make it active as of this
        tick; one that has been still since a tick idle_timeout ago is closed."""
        limit = self.options.idle_timeout
        for connection in list(self.connections):
            moved = connection.bytes_in + connection.bytes_out
            if moved != connection.moved:
                connection.moved, connection.quiet_since = moved, now
            elif now - connection.quiet_since >= limit:
                log.info("closing %s: idle for %gs (idle_timeout)", client_text(connection.peer), limit)
                connection.quiet_since = math.inf  # once: a closing connection stays in the set until lost
                _end(connection.transport)

    def _reopen_logs(self) -> None:
        if self.spec.on_reopen_logs is not None:
            self.spec.on_reopen_logs()

    async def _finish(self) -> None:
        """Stop accepting, serve what is queued where asked, wait for the handlers, cancel the rest."""
        slot = self.slot
        mask = -1 if slot.stop_mode == STOP_SHUTDOWN else slot.drain_mask
        deadline = slot.stop_deadline or time.monotonic() + self.spec.graceful_timeout
        for endpoint in self.endpoints:
            endpoint.stop_accepting()
        for _ in range(SETTLE_TURNS):  # connections the loop has accepted get their connection_made()
            await asyncio.sleep(0)
        for index, endpoint in enumerate(self.endpoints):
            if mask >> index & 1:
                await endpoint.drain(deadline)
        for endpoint in self.endpoints:
            endpoint.close()  # datagram listeners stop reading: what is queued stays for the other workers
        await self._wait_handlers(deadline - min(CANCEL_MARGIN, self.spec.graceful_timeout / 4))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks or self.connections:
            log.info("worker %d: cancelled %d handlers at the stop's deadline", self.pid,
                     len(self.tasks.keys() | {c for c in self.connections if isinstance(c, _ProtocolConnection)}))
        for connection in list(self.connections):
            connection.close()  # a Protocol's: connection_lost(); a task's: closed by the cancelled task too
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=CANCEL_GRACE)
        self.slot.add_tally(self.tally)
        if self.access is not None:
            self.access.flush()

    async def _wait_handlers(self, until: float) -> None:
        while (self.tasks or self.connections or self.unmade) and (left := until - time.monotonic()) > 0:
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=min(left, STOP_POLL))
            else:  # only Protocol connections: nothing to wait on but their closing
                await asyncio.sleep(min(left, STOP_POLL))

    # -- the watchdog's view (called from its thread) ---------------------------------------------

    def turns_again(self) -> None:
        """The block is over: the slot no longer names the client of a block (rule 3)."""
        self.slot.describe(b"", b"")
        log.warning("worker %d: the event loop turns again", self.pid)

    def blocked(self, late: float) -> None:
        """Log which task holds the loop, with the main thread's stack; name its client in the slot."""
        assert self.loop is not None
        task = asyncio.current_task(self.loop)
        connection = self.tasks.get(task) if task is not None else None
        frame = sys._current_frames().get(self.main_thread)
        stack = "".join(traceback.format_stack(frame, STACK_FRAMES)) if frame is not None else "(no stack)\n"
        what = "a callback, not a task"
        if task is not None:
            handler = connection.endpoint.handler if connection else None
            what = f"task {task.get_name()} in handler {_name_of(handler)}" if handler else f"task {task.get_name()}"
        client, listener = (client_text(connection.peer), connection.endpoint.name) if connection else ("-", "-")
        if connection is not None:
            self.slot.describe(client.encode(errors="replace"), listener.encode(errors="replace"))
        log.error("worker %d: the event loop has not turned for %.1fs: %s, client %s on %s; main thread:\n%s",
                  self.pid, late, what, client, listener, stack.rstrip("\n"))


_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class _OutOfFiles:
    """Rule 6: a worker out of descriptors says so, once per RESOURCE_REPORT_INTERVAL."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.limit = 0 if soft == resource.RLIM_INFINITY else soft
        self.lines = RateLimit(RESOURCE_REPORT_INTERVAL)

    def report(self, what: str) -> None:
        suppressed = self.lines.allow()
        if suppressed is None:
            return
        log.error("worker %d: %s (%d similar reports suppressed); raise the open files limit (LimitNOFILE=, "
                  "ulimit -n) or run more workers", self.pid, what, suppressed)

    def accept_failed(self, exc: OSError) -> None:
        self.report(f"cannot take new connections: {exc.strerror or exc}")

    def check(self, connections: int) -> None:
        """On each tick: near the limit, count the descriptors open (uvloop refuses in silence)."""
        if not self.limit or connections < self.limit * FD_COUNT_FROM:
            return
        try:
            used = len(os.listdir("/proc/self/fd"))
        except OSError:  # no /proc, or no descriptor left to read it with
            used = self.limit
        if used >= self.limit - FD_HEADROOM:
            self.report(f"{used} of its {self.limit} open files in use (RLIMIT_NOFILE): new connections are refused")

    def exception_handler(self, previous: _ExceptionHandler | None) -> _ExceptionHandler:
        """The loop's exception handler: a failed accept() for want of resources is a report;
        anything else goes to *previous* (or the loop's default: logged with its traceback)."""
        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
                self.accept_failed(exc)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
        return handle


def _name_of(handler: Any) -> str:
    return f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', repr(handler))}"


def _leave_now(worker: EventLoopWorker) -> None:
    """QUIT, INT: leave at once (no drain), as the synchronous worker does."""
    worker.slot.add_tally(worker.tally)
    if worker.access is not None:
        worker.access.flush()
    flush_std_streams()
    os._exit(0)


def _report_after(timeout: float) -> float:
    return min(BLOCKED_REPORT, timeout / 2) if timeout else BLOCKED_REPORT


class _Watchdog(threading.Thread):
    """Watches the loop's turns from a thread: a late loop is reported once per block."""

    def __init__(self, worker: EventLoopWorker, threshold: float) -> None:
        super().__init__(name="prefork-loop-watchdog", daemon=True)
        self.worker = worker
        self.threshold = threshold
        self.done = threading.Event()

    def run(self) -> None:
        reported = False
        while not self.done.wait(WATCH_INTERVAL):
            late = time.monotonic() - self.worker.turned_at - TICK
            if late > self.threshold and not reported:
                reported = True
                self.worker.blocked(late)
            elif late <= 0 and reported:
                reported = False
                self.worker.turns_again()

    def stop(self) -> None:
        self.done.set()


# -- listeners --------------------------------------------------------------------------------


class _Gate:
    """The allow-list of a listener (prefork.allowlist.guard wraps its verify_request)."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return True


class _Endpoint:
    """One listener of the worker: its socket, its handler, its scoreboard counter."""

    def __init__(self, worker: EventLoopWorker, listener: Listener, index: int, handler: Any,
                 spec: WorkerSpec) -> None:
        self.worker = worker
        self.sock = listener.sock
        self.name = listener.name
        self.counter = spec.counter_indexes[index] if spec.counter_indexes else index
        self.tally_index = min(self.counter, MAX_LISTENERS - 1)  # its place in the worker's Tally
        self.bucket_base = self.tally_index * BUCKETS
        self.handler = handler
        self.info = Endpoint(listener.name, listener.sock)
        self.gate: _Gate | None = None
        if listener.spec.allow:
            self.gate = _Gate()
            guard(self.gate, listener.spec.allow, listener.name)

    def admits(self, peer: Any) -> bool:
        """The allow-list's verdict on *peer*; a refusal is logged (rate-limited) and in the access log."""
        if self.gate is None or self.gate.verify_request(None, peer):
            return True
        if self.worker.access is not None:
            self.worker.access.record(client_text(peer), self.name, self.worker.pid, 0.0, None, None, "refused")
        return False

    def record(self, peer: Any, started: float, bytes_in: int, bytes_out: int, outcome: str,
               tls: str | None = None) -> None:
        """A connection closed or a datagram handled: counted with its time (one clock read, for
        both) in the worker's Tally, which the tick adds to the slot, and with an access log its
        line (*tls*: its version and cipher)."""
        seconds = _monotonic() - started
        worker = self.worker
        tally, index = worker.tally, self.tally_index
        tally.served[index] += 1
        tally.counts[self.bucket_base + (0 if seconds < FIRST_BOUND else bisect_left(LATENCY_BOUNDS, seconds))] += 1
        tally.sums[index] += seconds
        access = worker.access
        if access is not None:
            access.record(client_text(peer), self.name, worker.pid, seconds, bytes_in, bytes_out, outcome, tls)

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    def stop_accepting(self) -> None:
        pass

    async def drain(self, deadline: float) -> None:
        pass

    def close(self) -> None:
        pass


def _endpoint(worker: EventLoopWorker, listener: Listener, index: int, handler: Any, spec: WorkerSpec) -> _Endpoint:
    if listener.is_stream:
        return _StreamEndpoint(worker, listener, index, handler, spec)
    return _DatagramEndpoint(worker, listener, index, handler, spec)


class _StreamEndpoint(_Endpoint):
    """A stream listener: a server over a copy of the master's socket, a task per connection.

    A ?proxy or ?tls listener's connections are accepted here instead, and each passes its
    stages (prefork.aiostages) before its protocol is made.
    """

    server: asyncio.AbstractServer | None = None
    acceptor: Acceptor | None = None

    def __init__(self, worker: EventLoopWorker, listener: Listener, index: int, handler: Any,
                 spec: WorkerSpec) -> None:
        super().__init__(worker, listener, index, handler, spec)
        self.stages = Stages.of(listener, spec.tls_context, spec.proxy_allow, spec.handshake_timeout,
                                worker.stage_report)
        self.staging: set[asyncio.Task[None]] = set()  # connections in their stages

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # A copy: the server closes it when it stops, and the drain accepts from the original.
        backlog = self.worker.options.backlog or 65535  # capped by the kernel at somaxconn
        if self.stages is None:
            if not isinstance(loop, asyncio.BaseEventLoop):  # uvloop: backlog is the listen() queue only
                self.server = await loop.create_server(self.connection, sock=self.sock.dup(), backlog=backlog)
                return
            # asyncio's own loop also takes backlog as the most connections it accepts per wake-up,
            # and on EMFILE it tries that many accept()s, each reported, each scheduling a retry:
            # with 65535 the loop is lost for seconds. So ACCEPT_BATCH, then the listen() queue
            # put back as the master made it (the socket is shared by every worker).
            copy = self.sock.dup()
            self.server = await loop.create_server(self.connection, sock=copy, backlog=ACCEPT_BATCH)
            copy.listen(backlog)
            return
        if self.stages.context is not None:
            quiet_tls_errors(loop, self.worker.stage_report)
        listening = self.sock.dup()
        listening.listen(backlog)
        self.acceptor = Acceptor(loop, listening, self.admit, self.worker.out_of_files.accept_failed)
        self.acceptor.start()

    def connection(self) -> _Connection | _ProtocolConnection:
        """The protocol factory: called for each connection accepted, before its connection_made()."""
        self.worker.unmade += 1
        return self.protocol(None)

    def protocol(self, client: Any) -> _Connection | _ProtocolConnection:
        """A connection's protocol; *client*: its address, None for the socket's peer."""
        if isinstance(self.handler, type) and issubclass(self.handler, asyncio.Protocol):
            return (_CountedProtocolConnection if self.worker.counting else _ProtocolConnection)(self, client)
        assert self.worker.loop is not None
        return _Connection(self, self.worker.loop, client)

    def admit(self, conn: socket.socket, peer: Any) -> None:
        """A connection accepted on a staged listener: its stages in a task, then its protocol.
        It counts as accepted (unmade) from now: a stopping worker waits for it."""
        assert self.worker.loop is not None
        self.worker.unmade += 1
        task = self.worker.loop.create_task(self.open(conn, peer))
        self.staging.add(task)
        task.add_done_callback(self.staging.discard)

    async def open(self, conn: socket.socket, peer: Any) -> None:
        assert self.worker.loop is not None and self.stages is not None
        made: list[_Connection | _ProtocolConnection] = []

        def make(client: Any) -> _Connection | _ProtocolConnection:
            made.append(self.protocol(client))
            return made[0]
        try:
            await self.stages.connect(self.worker.loop, conn, peer, make)
        finally:
            if not made or made[0].transport is None:
                self.worker.unmade -= 1  # refused, or cancelled, before its connection_made()

    def tls_of(self, transport: asyncio.BaseTransport) -> str | None:
        """The access log's tls field for a connection of this listener."""
        if self.stages is None or self.stages.context is None:
            return None
        return tls_text(transport.get_extra_info("ssl_object"))

    def accepted(self, connection: _Connection) -> None:
        """Called by a connection once it is made: the allow-list, then its handler's task."""
        self.worker.unmade -= 1
        if not self.admits(connection.peer):
            connection.close()
            return
        assert self.worker.loop is not None
        task = self.worker.loop.create_task(self.serve(connection))
        self.worker.started(task, connection)

    async def serve(self, connection: _Connection) -> None:
        started, outcome = time.monotonic(), "error"
        try:
            if isinstance(self.handler, type) and issubclass(self.handler, AsyncStreamRequestHandler):
                await self.handler(connection.reader, connection.writer, connection.peer, self.info).run()
            else:
                await self.handler(connection.reader, connection.writer)
            outcome = "ok"
        except asyncio.CancelledError:
            pass  # the stop's deadline: the connection is closed below
        except Exception:
            log.exception("worker %d: handler failed on %s from %s; connection closed", self.worker.pid,
                          self.name, client_text(connection.peer))
        finally:
            connection.close()
            self.worker.finished(asyncio.current_task(), connection)
            self.record(connection.peer, started, connection.bytes_in, connection.bytes_out, outcome,
                        connection.tls)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.acceptor is not None:
            self.acceptor.stop()

    def close(self) -> None:
        """Connections still in their stages get DRAIN_PATIENCE more, as parked ones in sync mode."""
        if self.staging and self.worker.loop is not None:
            self.worker.loop.call_later(DRAIN_PATIENCE, _cancel_all, list(self.staging))

    async def drain(self, deadline: float) -> None:
        """Serve the connections queued on the listener now (a TCP queue's length, else up to DRAIN_LIMIT)."""
        assert self.worker.loop is not None
        budget = queued_requests(self.sock)
        self.sock.setblocking(False)
        while budget > 0 and time.monotonic() < deadline:
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # empty, or another worker took the rest
            except OSError as exc:
                log.warning("worker %d: draining %s: %s", self.worker.pid, self.name, exc)
                return
            budget -= 1
            conn.setblocking(False)
            if self.stages is not None:
                self.admit(conn, peer)
            else:
                await self.worker.loop.connect_accepted_socket(self.connection, conn)


def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()


class _DatagramEndpoint(_Endpoint):
    """A datagram listener: the app's DatagramProtocol, or a task per datagram for a coroutine function."""

    transport: asyncio.DatagramTransport | None = None
    app: asyncio.DatagramProtocol | None = None
    call: Callable[[bytes, Any], None] | None = None  # the app's counted call (counted_call)
    replies: _CountingTransport | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if isinstance(self.handler, type):
            self.app = self.handler()  # its connection_made() comes with the transport: made()
            self.call = self.counted_call(self.app)
        await loop.create_datagram_endpoint(lambda: _Datagrams(self), sock=self.sock.dup())

    def made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.replies = _CountingTransport(transport, self.sock)
        if self.app is not None:
            # The counting transport only counts reply bytes for the access log, and a wrapper's
            # call on every reply costs a datagram more than all the rest prefork does for it.
            # (Its other part, replying after the stop, is for handlers that run as tasks.)
            counting = self.worker.access is not None
            self.app.connection_made(self.replies if counting else transport)  # type: ignore[arg-type]

    def receiver(self) -> Callable[[bytes, Any], None]:
        """What the loop calls with each datagram: received(), or where there is neither an
        allow-list nor an access log and the app is a DatagramProtocol, its counted call alone."""
        if self.call is not None and self.gate is None and self.worker.access is None:
            return self.call
        return self.received

    def received(self, data: bytes, peer: Any) -> None:
        """A datagram: the allow-list, then the app's task, or its counted (and logged) call."""
        if self.gate is not None and not self.admits(peer):
            return
        app, worker = self.app, self.worker
        if app is None:
            assert worker.loop is not None
            task = worker.loop.create_task(self.serve(data, peer))
            worker.started(task, None)
        elif worker.access is not None:
            self.logged(app, data, peer)
        else:
            assert self.call is not None
            self.call(data, peer)

    def counted_call(self, app: asyncio.DatagramProtocol) -> Callable[[bytes, Any], None]:
        """The app's datagram_received(), marking the loop busy, timed and counted in the worker's
        Tally. The path of every datagram, so what it uses is bound once, here, and its steps
        (mark_busy(), record()'s count) are written out: each attribute lookup and call left
        out is a few percent of a datagram's CPU."""
        worker, tally, failed = self.worker, self.worker.tally, self.failed
        served, counts, sums = tally.served, tally.counts, tally.sums  # cleared in place, never replaced
        index, base, first_bound, clock = self.tally_index, self.bucket_base, FIRST_BOUND, _monotonic
        handle = app.datagram_received

        def call(data: bytes, peer: Any) -> None:
            if not worker.busy:
                worker.mark_busy()
            started = clock()
            try:
                handle(data, peer)
            except Exception:
                failed(peer)
            seconds = clock() - started
            served[index] += 1
            counts[base + (0 if seconds < first_bound else bisect_left(LATENCY_BOUNDS, seconds))] += 1
            sums[index] += seconds
        return call

    def logged(self, app: asyncio.DatagramProtocol, data: bytes, peer: Any) -> None:
        """A datagram served with an access log: its reply bytes counted, its outcome logged."""
        replies = self.replies
        assert replies is not None
        sent, started, outcome = replies.sent, _monotonic(), "ok"
        try:
            app.datagram_received(data, peer)
        except Exception:
            outcome = "error"
            self.failed(peer)
        self.record(peer, started, len(data), replies.sent - sent, outcome)

    def failed(self, peer: Any) -> None:
        log.exception("worker %d: datagram handler failed on %s from %s", self.worker.pid, self.name,
                      client_text(peer))

    async def serve(self, data: bytes, peer: Any) -> None:
        assert self.replies is not None
        started, sent, outcome = time.monotonic(), self.replies.sent, "error"
        try:
            await self.handler(data, peer, self.replies)
            outcome = "ok"
        except asyncio.CancelledError:
            pass  # the stop's deadline: the datagram is not answered
        except Exception:
            self.failed(peer)
        finally:
            self.worker.finished(asyncio.current_task(), None)
            self.record(peer, started, len(data), self.replies.sent - sent, outcome)

    async def drain(self, deadline: float) -> None:
        """Serve the datagrams queued now (at most DRAIN_LIMIT), read here rather than by the loop."""
        for _ in range(DRAIN_LIMIT):
            if time.monotonic() >= deadline:
                return
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("worker %d: draining %s: %s", self.worker.pid, self.name, exc)
                return
            self.received(data, peer)
            await asyncio.sleep(0)  # let the loop send the reply

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.replies is not None:
            self.replies.closed = True


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, endpoint: _DatagramEndpoint) -> None:
        self.endpoint = endpoint
        # The loop calls the endpoint's receiver itself: one frame less per datagram.
        self.datagram_received = endpoint.receiver()  # type: ignore[method-assign,assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.endpoint.made(cast(asyncio.DatagramTransport, transport))  # uvloop's is not a subclass

    def error_received(self, exc: Exception) -> None:
        app = self.endpoint.app
        if app is not None:
            app.error_received(exc)
        else:
            log.debug("worker %d: %s: %s", self.endpoint.worker.pid, self.endpoint.name, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        app = self.endpoint.app
        if app is not None:
            app.connection_lost(exc)


class _CountingTransport:
    """The datagram transport a handler gets: counts the bytes of its replies.

    A stopping worker closes its datagram transports at once, so that the datagrams queued
    on the shared socket go to the other workers; a handler still running then replies
    through the listener's own socket.
    """

    __slots__ = ("_transport", "_send", "_sock", "sent", "closed")

    def __init__(self, transport: asyncio.DatagramTransport, sock: socket.socket) -> None:
        self._transport = transport
        self._send = transport.sendto
        self._sock = sock
        self.sent = 0
        self.closed = False  # set by the endpoint when it closes the transport

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent += len(data)
        if not self.closed:
            self._send(data, addr)
            return
        try:
            self._sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError as exc:  # a full buffer or a gone peer: a datagram's reply may be lost
            log.debug("reply to %s after the stop not sent: %s", client_text(addr), exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# -- stream connections -----------------------------------------------------------------------


class _ProtocolConnection(asyncio.Protocol):
    """A connection served by the app's asyncio.Protocol: no task, the app's callbacks in the loop.

    Reports to the worker, logs an exception of the app's callbacks with its traceback and
    closes the connection. Counts no bytes (rule 7: _CountedProtocolConnection does).
    """

    def __init__(self, endpoint: _StreamEndpoint, client: Any = None) -> None:
        self.endpoint = endpoint
        self.app: asyncio.Protocol = endpoint.handler()
        self.transport: asyncio.BaseTransport | None = None
        self.peer: Any = client  # the PROXY header's client; else the socket's peer, once made
        self.tls: str | None = None
        self.started = self.quiet_since = time.monotonic()
        self.bytes_in = self.bytes_out = self.moved = 0
        self.outcome = "ok"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")
        endpoint = self.endpoint
        self.tls = endpoint.tls_of(transport)
        endpoint.worker.unmade -= 1
        if not endpoint.admits(self.peer):
            self.app = None  # type: ignore[assignment]
            transport.close()
            return
        endpoint.worker.started(None, self)
        self._call(self.app.connection_made, self.app_transport(transport))

    def app_transport(self, transport: asyncio.BaseTransport) -> Any:
        """The transport the app writes to: the loop's own."""
        return transport

    def data_received(self, data: bytes) -> None:
        try:  # _call(), written out: the path of every chunk received
            self.app.data_received(data)
        except Exception:
            self._failed()

    def eof_received(self) -> bool | None:
        try:
            return self.app.eof_received()
        except Exception:
            self._failed()
            return None

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is None:
            return  # refused by the allow-list
        self._call(self.app.connection_lost, exc)
        endpoint = self.endpoint
        endpoint.worker.finished(None, self)
        endpoint.record(self.peer, self.started, self.bytes_in, self.bytes_out, self.outcome, self.tls)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _call(self, callback: Callable[[Any], object], argument: Any) -> None:
        try:
            callback(argument)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        self.outcome = "error"
        log.exception("worker %d: handler failed on %s from %s; connection closed", self.endpoint.worker.pid,
                      self.endpoint.name, client_text(self.peer))
        self.close()


class _CountedProtocolConnection(_ProtocolConnection):
    """Rule 7: a Protocol connection that counts its bytes, for the access log or idle_timeout."""

    def app_transport(self, transport: asyncio.BaseTransport) -> Any:
        return _CountingStreamTransport(transport, self)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)


def _end(transport: asyncio.BaseTransport | None) -> None:
    """An idle connection's transport: closed, or aborted where what it has to send waits for a
    peer that does not read (a close would wait for that flush forever)."""
    if transport is None:
        return
    if cast(asyncio.WriteTransport, transport).get_write_buffer_size():
        cast(asyncio.WriteTransport, transport).abort()
    else:
        transport.close()


class _CountingStreamTransport:
    """The transport an app's Protocol gets where bytes are counted: counts what it writes."""

    __slots__ = ("_transport", "_connection")

    def __init__(self, transport: asyncio.BaseTransport, connection: _ProtocolConnection) -> None:
        self._transport: Any = transport
        self._connection = connection

    def write(self, data: Any) -> None:
        self._connection.bytes_out += len(data)
        self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Connection(asyncio.StreamReaderProtocol):
    """One stream connection: asyncio's reader protocol, counting bytes."""

    def __init__(self, endpoint: _StreamEndpoint, loop: asyncio.AbstractEventLoop, client: Any = None) -> None:
        self.reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        super().__init__(self.reader, loop=loop)
        self.endpoint = endpoint
        self.loop = loop
        self.bytes_in = self.bytes_out = self.moved = 0
        self.quiet_since = time.monotonic()
        self.peer: Any = client  # the PROXY header's client; else the socket's peer, once made
        self.tls: str | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.writer: _CountingWriter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")
        self.tls = self.endpoint.tls_of(transport)
        self.writer = _CountingWriter(transport, self, self.reader, self.loop)
        self.endpoint.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _CountingWriter(asyncio.StreamWriter):
    """asyncio's StreamWriter, counting what the handler writes (in its connection's bytes_out)."""

    def __init__(self, transport: asyncio.BaseTransport, connection: _Connection, reader: asyncio.StreamReader,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport, connection, reader, loop)  # type: ignore[arg-type]
        self.connection = connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.connection.bytes_out += len(data)
        super().write(data)
