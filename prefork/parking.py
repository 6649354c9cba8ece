"""Stream connections between accept and their handler: waiting for the first message. Runs in: worker.

A connection is accepted, then waits in the worker's parking lot (its own epoll, watched by the
worker's loop) until its first message is in the kernel's buffer; only then does its server's
``dispatch_request`` run the handler. Idle and slow clients cost a descriptor, never a handler.

Rules:

1. Ready means: the handler class's ``message_delimiter`` (bytes, or a tuple of alternatives) is
   in what a ``MSG_PEEK`` sees, or ``FIRST_MESSAGE_MAX`` bytes are buffered, or the client shut
   down its sending side (nothing more will come: the handler reads what there is, or EOF).
   Without a delimiter the first byte is enough. Nothing is read: the handler sees every byte.
2. A connection ready when accepted is served at once, as without parking: one peek, no epoll
   registration, no clock read; only the others wait. The worker's loop looks at the lot only
   while it holds connections, so an empty lot costs a turn nothing (datagrams, spoken clients).
   A TCP listener also gets ``TCP_DEFER_ACCEPT``, so a silent client waits in the kernel at first.
3. Every wait is bounded: by the stricter of the ``read_timeout`` setting and the handler's own
   ``timeout``; by ``PEEK_BUDGET`` bytes of peeking per connection (a client dribbling a byte at a
   time is closed, not peeked at for ever); by the lot's size (``parking_limit()``), the oldest
   connection closing for a new one. Each of these costs one log line per ``REPORT_INTERVAL``
   with a count, never a traceback. A client that resets while parked is forgotten silently.
4. Not parked: listeners whose protocol has the server speak first (``?first=server`` in the bind
   spec, or ``server_speaks_first = True`` on the handler class), and datagrams.
5. A child forked from the worker (fork mode) closes its copies of the parked connections at
   once, so that only the worker decides when they end.
6. Before its first message, a connection may have stages to pass, in order (``FirstMessage.stages``:
   the PROXY header, prefork.proxy, then the TLS handshake, prefork.tls), all within
   ``stage_timeout`` of its accept. A stage never blocks: it says what it waits for (``Waiting``)
   and the lot watches the socket for it. A stage that fails (``StageFailed``) or runs out of
   time closes the connection, with one log line per stage and kind of failure per
   ``REPORT_INTERVAL``. Listeners with stages are parked even when the server speaks first;
   those connections are ready once their stages are done.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import os
import resource
import select
import socket
import time
import weakref
from typing import Any, Callable, Protocol

from prefork.accounting import client_text
from prefork.ratelimit import RateLimit

__all__ = ["StreamServer", "FirstMessage", "ParkingLot", "parking_limit", "defer_accept", "FIRST_MESSAGE_MAX",
           "Stage", "StageFailed", "Waiting", "Connection", "Report"]

log = logging.getLogger("prefork.parking")

# The most bytes peeked at to find the first message; with this much buffered the handler is
# given the connection anyway (it may answer a 414 or echo a piece). workers.echo's MAX_LINE.
FIRST_MESSAGE_MAX = 64 * 1024
# Bytes a parked connection may cost in peeks (each new piece means peeking all of the buffer
# again): a 64 KiB HTTP head in 1448-byte segments costs 1.5 MB, a byte-a-time dribble is
# closed near 3 KB. Bounds the CPU one slow client can take.
PEEK_BUDGET = 4 * 1024 * 1024
# Parked connections per worker, at most; and at most half the descriptor limit, so handlers,
# files and the access log keep the other half.
MAX_PARKED = 1024
MIN_PARKED = 8
# Accepts per wake-up of a listener (as prefork.servers' batch): a stop stays prompt.
ACCEPT_BATCH = 32
# TCP_DEFER_ACCEPT: Linux counts it in SYN-ACK retransmissions, so 1 s is one: a client that
# sends at once is accepted with its data; a silent one reaches accept (and the lot) after ~1 s.
DEFER_SECONDS = 1
# One log line per reason per this many seconds, per worker, with the count since the last.
REPORT_INTERVAL = 10.0
# How often the lot looks for expired connections: timeouts are seconds long, and a scan of
# every parked connection on every turn of a busy loop would cost more than it saves.
EXPIRE_EVERY = 0.5

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_WATCH = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_WATCH_WRITE = select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_GONE_EVENTS = select.EPOLLHUP | select.EPOLLERR
_READY, _WAIT, _GONE, _DRIBBLING = "ready", "wait", "gone", "dribbling"
# The lots of this process, closed in its forked children (rule 5); the hook is registered once.
_lots: weakref.WeakSet[ParkingLot] = weakref.WeakSet()
_at_fork_registered = False


class StreamServer(Protocol):
    """What the lot needs of a server (prefork.servers.TCPServer has it): one request in two steps."""

    def take_request(self) -> tuple[Any, Any] | None: ...

    def dispatch_request(self, request: Any, client_address: Any) -> None: ...


class Waiting(enum.Enum):
    """What a stage waits for before it can go on (rule 6)."""

    READ = "read"
    WRITE = "write"


class StageFailed(Exception):
    """A stage refuses a connection (rule 6): *kind* names the failure (one log line per kind and
    REPORT_INTERVAL, so it must come from a small set), *detail* says more; *quiet*: no line (the
    client reset)."""

    def __init__(self, kind: str, detail: str = "", quiet: bool = False) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail, self.quiet = kind, detail, quiet


class Connection(Protocol):
    """What a stage sees of a parked connection; it may replace the socket (TLS wraps it) and the
    address (the PROXY header's client)."""

    sock: socket.socket
    address: Any
    hung_up: bool  # the client shut down its sending side: what is buffered is all that will come


class Stage(Protocol):
    """One step between accept and the first message (rule 6)."""

    name: str  # for the log lines: "PROXY header", "TLS handshake"

    def begin(self, conn: Connection) -> None:
        """Called once, when the connection reaches the stage; may raise StageFailed."""

    def step(self, conn: Connection) -> Waiting | None:
        """Go as far as possible without blocking: None when done, else what to wait for."""


@dataclasses.dataclass(frozen=True)
class FirstMessage:
    """When a parked connection is ready for its handler (rules 1 and 6), and how long it may wait."""

    delimiters: tuple[bytes, ...] = ()  # empty: the first byte is enough
    timeout: float | None = None
    max_bytes: int = FIRST_MESSAGE_MAX
    stages: tuple[Stage, ...] = ()
    stage_timeout: float | None = None
    waits: bool = True  # False: the server speaks first, ready once the stages are done

    @classmethod
    def of(cls, handler: Any, server_first: bool, read_timeout: float, stages: tuple[Stage, ...] = (),
           stage_timeout: float | None = None) -> FirstMessage | None:
        """The rule for a listener served by *handler* (a class); None where nothing waits (rules 4, 6)."""
        if server_first or getattr(handler, "server_speaks_first", False):
            return cls(stages=stages, stage_timeout=stage_timeout, waits=False) if stages else None
        declared = getattr(handler, "message_delimiter", None)
        delimiters = () if declared is None else (declared,) if isinstance(declared, bytes) else tuple(declared)
        limits = [t for t in (read_timeout, getattr(handler, "timeout", None)) if t]
        return cls(delimiters, min(limits) if limits else None, stages=stages, stage_timeout=stage_timeout)

    def complete(self, data: bytes) -> bool:
        if not self.delimiters or len(data) >= self.max_bytes:
            return bool(data)
        for delimiter in self.delimiters:  # a loop, not any(): this runs once per connection
            if delimiter in data:
                return True
        return False


@dataclasses.dataclass(eq=False, slots=True)
class _Parked:
    sock: socket.socket
    address: Any
    server: StreamServer
    rule: FirstMessage
    deadline: float
    peeked: int = 0
    stage: int = 0  # the index of the stage it is in; len(rule.stages) once past them
    begun: bool = False  # the current stage's begin() has run
    hung_up: bool = False
    mask: int = _WATCH


class ParkingLot:
    """The worker's parked connections, in the order they came (the oldest first)."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._epoll = select.epoll()
        self._parked: dict[int, _Parked] = {}
        self._ready: collections.deque[_Parked] = collections.deque()
        self._report = Report(clock)
        self._next_expiry = -math.inf
        _close_parked_in_forked_children(self)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def __len__(self) -> int:
        return len(self._parked) + len(self._ready)

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def take(self, server: StreamServer, rule: FirstMessage, interrupted: Callable[[], bool],
             batch: int = ACCEPT_BATCH) -> int:
        """Accept up to *batch* connections from *server*'s ready listener; serve the ready ones at once."""
        take_request, admit = server.take_request, self._admit
        for taken in range(batch):
            request = take_request()
            if request is None:
                return taken
            admit(server, rule, *request)
            if interrupted():
                return taken + 1
        return batch

    def collect(self, timeout: float = 0) -> None:
        """Look at the parked connections the lot's epoll reports (waiting at most *timeout*)."""
        for fd, events in self._epoll.poll(timeout):
            parked = self._parked.get(fd)
            if parked is not None:
                self._settle(parked, self._advance(parked, events))

    def serve(self, interrupted: Callable[[], bool]) -> None:
        """Hand the ready connections to their servers, in order, until *interrupted()*."""
        while self._ready and not interrupted():
            parked = self._ready.popleft()
            parked.server.dispatch_request(parked.sock, parked.address)

    def expire(self) -> None:
        """Close the connections whose first message did not come in time (rule 3)."""
        now = self.clock()
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRE_EVERY
        for parked in [p for p in self._parked.values() if p.deadline <= now]:
            stages = parked.rule.stages
            if parked.stage < len(stages):
                self._report.stalled(stages[parked.stage].name, parked.rule.stage_timeout)
            else:
                self._report.count("timeout", parked.rule.timeout)
            self._close(parked)

    def close(self) -> None:
        """Close every connection still waiting (and the lot): they sent no complete message."""
        for parked in list(self._parked.values()) + list(self._ready):
            self._close(parked)
        self._ready.clear()
        self._epoll.close()

    def _admit(self, server: StreamServer, rule: FirstMessage, sock: Any, address: Any) -> None:
        if not isinstance(sock, socket.socket) or sock.fileno() < 0:
            server.dispatch_request(sock, address)  # not a socket we can watch: as without parking
            return
        data = None
        if not rule.stages:
            data = _peek(sock, rule.max_bytes)
            if type(data) is bytes and (not data or rule.complete(data) or type(sock) is not socket.socket):
                server.dispatch_request(sock, address)  # rule 2: one peek, no wait for a client that has spoken
                return
        parked = _Parked(sock, address, server, rule, self._deadline(rule.stage_timeout if rule.stages else rule.timeout))
        state = self._advance(parked, 0, data)
        if state == _READY:
            server.dispatch_request(parked.sock, parked.address)  # rule 2: no wait for a client that has spoken
            return
        if state != _WAIT:
            self._settle(parked, state)
            return
        if len(self._parked) >= self.limit:
            self._report.count("full", self.limit)
            self._close(next(iter(self._parked.values())))
        self._parked[parked.sock.fileno()] = parked
        self._epoll.register(parked.sock.fileno(), parked.mask)

    def _deadline(self, timeout: float | None) -> float:
        return math.inf if timeout is None else self.clock() + timeout

    def _advance(self, parked: _Parked, events: int, data: bytes | str | None = None) -> str:
        """Take *parked* through what is left of its stages (rule 6), then look at its buffer (rule 1);
        *data*: a peek already made (only without stages)."""
        stages = parked.rule.stages
        parked.hung_up = parked.hung_up or bool(events & (select.EPOLLRDHUP | select.EPOLLHUP))
        while parked.stage < len(stages):
            stage = stages[parked.stage]
            try:
                if not parked.begun:
                    parked.begun = True
                    stage.begin(parked)
                waiting = stage.step(parked)
            except StageFailed as exc:
                if not exc.quiet:
                    self._report.failed(stage.name, exc, parked.address)
                return _GONE
            if waiting is not None:
                self._watch(parked, _WATCH if waiting is Waiting.READ else _WATCH_WRITE)
                return _WAIT
            parked.stage, parked.begun = parked.stage + 1, False
            if parked.stage == len(stages):
                parked.deadline = self._deadline(parked.rule.timeout)
                self._watch(parked, _WATCH)
            events = 0  # those were the stage's events: the buffer is looked at afresh
        return _state(parked, events, data)

    def _watch(self, parked: _Parked, mask: int) -> None:
        if mask == parked.mask:
            return
        parked.mask = mask
        fd = parked.sock.fileno()
        if self._parked.get(fd) is parked:
            self._epoll.modify(fd, mask)

    def _settle(self, parked: _Parked, state: str) -> None:
        if state == _WAIT:
            return
        self._forget(parked)
        if state == _READY:
            self._ready.append(parked)
            return
        if state == _DRIBBLING:
            self._report.count("dribbling", parked.peeked)
        parked.sock.close()

    def _forget(self, parked: _Parked) -> None:
        fd = parked.sock.fileno()
        if self._parked.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _close(self, parked: _Parked) -> None:
        self._forget(parked)
        parked.sock.close()

    def _close_in_child(self) -> None:
        """Called in a child forked from the worker: drop its copies (rule 5), never shut them down."""
        for parked in list(self._parked.values()) + list(self._ready):
            parked.sock.close()
        self._parked.clear()
        self._ready.clear()
        self._epoll.close()


def _peek(sock: socket.socket, max_bytes: int) -> bytes | str:
    """What *sock*'s buffer holds, read with MSG_PEEK; _WAIT if nothing yet, _GONE if reset."""
    try:
        return socket.socket.recv(sock, max_bytes, _PEEK)  # the raw bytes, also under TLS
    except (BlockingIOError, InterruptedError):
        return _WAIT
    except OSError:
        return _GONE  # reset by the client: nobody is left to answer


def _state(parked: _Parked, events: int, data: bytes | str | None = None) -> str:
    """What a parked connection's buffer says now (rule 1); *data*: a peek already made."""
    if not parked.rule.waits or getattr(parked.sock, "pending", _nothing)():
        return _READY  # the server speaks first; or TLS holds decrypted bytes already
    if data is None:
        data = _peek(parked.sock, parked.rule.max_bytes)
    if isinstance(data, str):  # nothing to read: _WAIT, or _GONE
        return _GONE if data is _GONE or events & _GONE_EVENTS else _WAIT
    if not data or events & select.EPOLLRDHUP:
        return _READY  # EOF, or all the client will send: the handler sees it
    parked.peeked += len(data)
    if parked.rule.complete(data) or type(parked.sock) is not socket.socket:
        return _READY  # a wrapped (TLS) socket: its first record is all a peek can tell
    return _DRIBBLING if parked.peeked > PEEK_BUDGET else _WAIT


def _nothing() -> int:
    return 0


class Report:
    """Rules 3 and 6's log lines: one per reason per REPORT_INTERVAL, counting the rest.

    Also what asyncio mode's stages (prefork.aiostages) say, in the same words.
    """

    _TEXT = {
        "stalled": "closed %d connection(s) stalled in their %s (not done within %gs)",
        "failed": "closed %d connection(s): %s failed: %s (the last from %s)",
        "timeout": "closed %d connection(s) that sent no complete first message within %gs",
        "dribbling": "closed %d connection(s) dribbling their first message (the last after %d bytes of peeking)",
        "full": "closed %d waiting connection(s), the oldest, to make room (at most %d wait per worker)",
    }

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.limits: dict[str, RateLimit] = {}  # one per reason

    def count(self, reason: str, *details: Any) -> None:
        limit = self.limits.get(reason)
        if limit is None:
            limit = self.limits[reason] = RateLimit(REPORT_INTERVAL, self.clock)
        held = limit.allow()
        if held is None:
            return
        kind = reason.partition(":")[0]
        level = logging.WARNING if kind in ("full", "failed") else logging.INFO
        log.log(level, "worker %d: " + self._TEXT[kind], os.getpid(), held + 1, *details)  # this one and the held

    def stalled(self, stage: str, timeout: float | None) -> None:
        """A connection did not pass *stage* within *timeout* (rule 6)."""
        self.count(f"stalled:{stage}", stage, timeout)

    def failed(self, stage: str, exc: StageFailed, address: Any) -> None:
        """A stage refused a connection: one line per stage and kind of failure (rule 6)."""
        self.count(f"failed:{stage}:{exc.kind}", stage, exc, client_text(address))


def parking_limit() -> int:
    """How many connections a worker parks at most: MAX_PARKED, or half its descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_PARKED
    return max(MIN_PARKED, min(MAX_PARKED, soft // 2))


def defer_accept(sock: socket.socket, on: bool) -> None:
    """Set (or clear) TCP_DEFER_ACCEPT on a TCP listener (rule 2); nothing for other sockets.

    Cleared explicitly: a listener kept across a reload may have had it from the old workers.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(socket, "TCP_DEFER_ACCEPT"):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_SECONDS if on else 0)
    except OSError as exc:
        log.debug("cannot set TCP_DEFER_ACCEPT on %s: %s", sock, exc)  # an unusual socket: parking still works


def _close_parked_in_forked_children(lot: ParkingLot) -> None:
    global _at_fork_registered
    if not _at_fork_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _at_fork_registered = True
    _lots.add(lot)


def _after_fork_in_child() -> None:
    for lot in list(_lots):
        lot._close_in_child()
    _lots.clear()


