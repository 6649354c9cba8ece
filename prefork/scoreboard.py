"""The shared-memory scoreboard: one fixed-size slot per worker. Runs in: both.

Rules:

1. The master creates the map before the first fork; every worker inherits it. A file-backed
   map in the run directory lets ``prefork status`` read it without talking to the master.
2. A slot is written by exactly one writer at a time: the master claims and clears it, the
   worker that owns it writes everything else. Writes are plain memory stores (ctypes fields
   over the map): no system call per request. As the master clears a departed worker's slot
   it adds the slot's latency counts to the header's, between two increments of ``folds``, so
   a reader that sees ``folds`` odd or changed reads again (``latency``, ``open``). In thread
   mode a worker's request threads share its slot: two stores of one count at the same moment
   can lose one (the GIL does not make ``+=`` atomic; a lock per request would cost more).
3. Readers take a snapshot (``read``) and tolerate torn values: each field is read once and the
   master's decisions tolerate a value one request old.
4. Times are ``time.monotonic()`` seconds; CLOCK_MONOTONIC is the same clock in every process.
5. Nothing in the map is trusted beyond that: workers run app code and can write every slot,
   so the master signals only the pids it forked (a slot's pid is compared, never used), times
   read back are finite, and a file opened by ``open`` is checked whole (magic, version, size)
   before any field is read. Nothing is unpickled or evaluated: fields are fixed ctypes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
import os
import struct
import time
from bisect import bisect_left
from typing import Any, Callable

from prefork.latency import BUCKETS, LATENCY_BOUNDS, Histogram, from_counts

__all__ = ["Scoreboard", "SlotView", "MasterView", "Health", "RESTART_CAUSES", "MAX_LISTENERS", "BOOTING", "IDLE", "BUSY",
           "EXITING", "FREE", "STATE_NAMES", "NO_DEPTH", "LOOP_STALLED", "AGED_STATES", "Tally"]

# Slot states.
FREE, BOOTING, IDLE, BUSY, EXITING = 0, 1, 2, 3, 4
STATE_NAMES = {FREE: "free", BOOTING: "booting", IDLE: "idle", BUSY: "busy", EXITING: "exiting"}

# An event loop writes its slot every quarter second (prefork.aioworker's TICK); one that has
# not turned for this long serves nothing meanwhile: readers show it as "stalled", not idle or busy.
LOOP_STALLED = 2.0
# The shown states (SlotView.shown_state) whose age status and top show: a request's, a stall's.
AGED_STATES = frozenset({"busy", "stalled"})

# How the master wants a worker to stop (written before it sends SIGTERM).
STOP_NONE, STOP_RETIRE, STOP_SHUTDOWN = 0, 1, 2

# Room for the client address of the current request ("[ffff:...:ffff%eth0]:65535" fits).
_CLIENT_BYTES = 64
# Room for the listener the current request came in on.
_LISTENER_BYTES = 96
# Room for the cause of the last worker death before serving, e.g. "exit status 1: post_fork
# hook failed: ConnectionRefusedError(111, 'Connection refused')".
_CAUSE_BYTES = 240
# Per-listener request counters in each slot: a service with more listeners counts the rest
# under the last one.
MAX_LISTENERS = 8

# The file starts with a magic word and the layout version, so a reader never misreads a map
# written by another version of prefork. 0003: latency histograms, listener names, queue depths;
# 0004: the event-loop flag of a slot.
_MAGIC_PREFIX = b"PFSB"
_MAGIC = b"PFSB0004"
# Latency counts per slot (and per header, for departed workers): BUCKETS per listener counter.
_LATENCY_COUNTS = MAX_LISTENERS * BUCKETS
# A listen-queue depth the master could not read (a datagram or reuse_port listener, no TCP_INFO).
NO_DEPTH = -1
# How often a reader takes its copy again when the master folded a slot in the meantime.
_FOLD_RETRIES = 20
# rw-r--r-- less the umask: `prefork status` and the metrics process read it; only the master
# writes the file (workers write through the map they inherit).
_FILE_MODE = 0o644
# A reader refuses a header claiming more slots than this: no master makes that many.
_MAX_CAPACITY = 1 << 20
# Temporary names tried when creating the file (pid plus a counter; see _create_exclusive).
_CREATE_ATTEMPTS = 100


class _Slot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int64),
        ("generation", ctypes.c_int64),
        ("number", ctypes.c_int64),
        ("state", ctypes.c_int64),
        ("stop_mode", ctypes.c_int64),
        ("requests", ctypes.c_int64),
        ("active", ctypes.c_int64),
        ("started", ctypes.c_double),
        ("request_started", ctypes.c_double),
        ("last_tick", ctypes.c_double),
        # 1 while an event loop serves in the worker: its last_tick is its liveness, whatever its state.
        ("event_loop", ctypes.c_int64),
        ("drain_mask", ctypes.c_int64),  # listeners to drain fully on a retiring stop (bit = index)
        ("stop_deadline", ctypes.c_double),  # when a stopping worker must be gone (graceful_timeout)
        ("by_listener", ctypes.c_int64 * MAX_LISTENERS),
        ("client", ctypes.c_char * _CLIENT_BYTES),
        ("listener", ctypes.c_char * _LISTENER_BYTES),
        # Request latency, per listener counter: BUCKETS counts each (see prefork.latency), sums.
        ("latency", ctypes.c_int64 * _LATENCY_COUNTS),
        ("latency_sum", ctypes.c_double * MAX_LISTENERS),
    ]


# Causes of worker restarts, in the order of the header's counters.
RESTART_CAUSES = ("exit", "timeout", "recycle", "crash")


class _Header(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_char * 8),
        ("capacity", ctypes.c_int64),
        ("master_pid", ctypes.c_int64),
        ("master_started", ctypes.c_double),
        ("generation", ctypes.c_int64),
        ("target", ctypes.c_int64),
        ("restarts", ctypes.c_int64 * len(RESTART_CAUSES)),
        ("reloads_refused", ctypes.c_int64),  # HUP with a configuration that did not load
        ("reloads_failed", ctypes.c_int64),  # HUP whose new workers could not load the app
        # Health, for `prefork status` (see MasterView).
        ("tick", ctypes.c_double),
        ("short_since", ctypes.c_double),
        ("crash_streak", ctypes.c_int64),
        ("stopping", ctypes.c_int64),
        ("last_crash", ctypes.c_char * _CAUSE_BYTES),
        # The listeners in the order of the per-listener counters, and their accept-queue depth
        # (NO_DEPTH where unknown), published by the master on every turn of its loop.
        ("listener_names", (ctypes.c_char * _LISTENER_BYTES) * MAX_LISTENERS),
        ("queue_depth", ctypes.c_int64 * MAX_LISTENERS),
        # The latency histograms of departed workers, folded in by release(): the exported
        # histogram never goes down when a worker leaves. Odd `folds`: a fold is under way.
        ("folds", ctypes.c_int64),
        ("retired_latency", ctypes.c_int64 * _LATENCY_COUNTS),
        ("retired_latency_sum", ctypes.c_double * MAX_LISTENERS),
    ]


@dataclasses.dataclass(frozen=True)
class MasterView:
    """What the master publishes about the pool as a whole."""

    pid: int
    started: float
    generation: int
    target: int
    restarts: dict[str, int]
    reloads_refused: int = 0
    reloads_failed: int = 0
    health: Health | None = None
    listeners: tuple[str, ...] = ()  # in the order of the per-listener counters
    queue_depth: tuple[int, ...] = ()  # accept-queue length of each; NO_DEPTH where unknown


@dataclasses.dataclass(frozen=True)
class Health:
    """What the master knows of its pool's health, published on every turn of its loop."""

    tick: float = 0.0  # the master's last turn (monotonic): a stale one means a stuck master
    short_since: float = 0.0  # since when fewer workers serve than the target; 0: not short
    crash_streak: int = 0  # workers in a row that died before serving
    stopping: bool = False
    last_crash: str = ""  # how the last of them died


@dataclasses.dataclass(frozen=True)
class SlotView:
    """A snapshot of one slot, as the master and the CLI see it."""

    index: int
    pid: int
    generation: int
    number: int
    state: int
    requests: int
    active: int
    started: float
    request_started: float
    last_tick: float
    client: str
    listener: str
    by_listener: tuple[int, ...] = ()
    event_loop: bool = False  # an event loop serves: last_tick is when it last turned

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "?")

    def request_age(self, now: float) -> float:
        """Seconds spent on the current request (0 when idle)."""
        return now - self.request_started if self.state == BUSY else 0.0

    def loop_stalled(self, now: float) -> float:
        """Seconds since an event loop last turned, busy or idle (0 for a synchronous worker)."""
        return now - self.last_tick if self.event_loop else 0.0

    def stalled(self, now: float) -> bool:
        """An event loop that has not turned for LOOP_STALLED seconds: it serves nothing now."""
        return self.loop_stalled(now) > LOOP_STALLED and self.state in (IDLE, BUSY)

    def shown_state(self, now: float) -> str:
        """The state as status and top show it: "stalled" for a stalled loop, else state_name."""
        return "stalled" if self.stalled(now) else self.state_name

    def shown_age(self, now: float) -> float:
        """The age status and top show: a stalled loop's stall, a busy worker's request; else 0."""
        return self.loop_stalled(now) if self.stalled(now) else self.request_age(now)


class Scoreboard:
    """Fixed array of worker slots in a shared map."""

    def __init__(self, buffer: Any, path: str | None, owner: bool) -> None:
        self._buffer = buffer
        self.path = path
        self._owner = owner
        self._inode = 0
        self._header = _Header.from_buffer(buffer)
        self.capacity = int(self._header.capacity)
        array_type = _Slot * self.capacity
        self._slots = array_type.from_buffer(buffer, ctypes.sizeof(_Header))

    @classmethod
    def create(cls, capacity: int, path: str | None = None) -> Scoreboard:
        """Make a zeroed scoreboard. Called before fork, in the master."""
        size = ctypes.sizeof(_Header) + capacity * ctypes.sizeof(_Slot)
        if path is None:
            buffer = mmap.mmap(-1, size)
            _write_header(buffer, capacity)
        else:  # the header is written before the file gets its name: no reader sees it blank
            buffer = _map_new_file(path, size, lambda new: _write_header(new, capacity))
        board = cls(buffer, path, owner=True)
        board._inode = os.stat(path).st_ino if path else 0
        return board

    @classmethod
    def open(cls, path: str) -> Scoreboard:
        """Map an existing scoreboard file for reading (``prefork status``)."""
        with open(path, "rb") as f:
            try:
                buffer = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            except ValueError:
                raise ValueError(f"{path} is empty, not a prefork scoreboard") from None
        try:
            # ctypes needs a writable buffer: take a private copy of the read-only map.
            data = _copy(buffer)
        finally:
            buffer.close()
        _check_layout(path, data)
        return cls(data, path, owner=False)

    @property
    def master_pid(self) -> int:
        return int(self._header.master_pid)

    def set_master_pid(self, pid: int) -> None:
        self._header.master_pid = pid

    def publish(self, generation: int, target: int, restarts: dict[str, int], reloads_refused: int = 0,
                reloads_failed: int = 0) -> None:
        """Master: the pool's figures, for `prefork status`, reload waits and metrics."""
        header = self._header
        header.generation, header.target = generation, target
        header.reloads_refused, header.reloads_failed = reloads_refused, reloads_failed
        for i, cause in enumerate(RESTART_CAUSES):
            header.restarts[i] = restarts.get(cause, 0)

    def publish_health(self, health: Health) -> None:
        """Master: its pool's health, on every turn of its loop."""
        header = self._header
        header.tick, header.short_since = health.tick, health.short_since
        header.crash_streak, header.stopping = health.crash_streak, int(health.stopping)
        header.last_crash = health.last_crash.encode(errors="replace")[:_CAUSE_BYTES - 1]

    def master(self) -> MasterView:
        header = self._header
        restarts = {cause: int(header.restarts[i]) for i, cause in enumerate(RESTART_CAUSES)}
        health = Health(_finite(header.tick), _finite(header.short_since), int(header.crash_streak),
                        bool(header.stopping), header.last_crash.decode(errors="replace"))
        names = tuple(name.value.decode(errors="replace") for name in header.listener_names)
        count = next((i for i, name in enumerate(names) if not name), len(names))
        return MasterView(int(header.master_pid), _finite(header.master_started), int(header.generation),
                          int(header.target), restarts, int(header.reloads_refused), int(header.reloads_failed),
                          health, names[:count], tuple(header.queue_depth)[:count])

    def publish_listeners(self, names: list[str], depths: list[int]) -> None:
        """Master: the listener of each per-listener counter and its accept-queue depth."""
        header = self._header
        for i, name in enumerate(names[:MAX_LISTENERS]):
            header.listener_names[i].value = name.encode(errors="replace")[:_LISTENER_BYTES - 1]
            header.queue_depth[i] = depths[i] if i < len(depths) else NO_DEPTH

    def latency(self) -> list[Histogram]:
        """Per listener counter: the latency histogram of every worker so far, departed ones included.

        Taken again while the master is folding a departed worker's slot into the header, so a
        request is never counted twice or lost between the slot and the header.
        """
        header = self._header
        for _ in range(_FOLD_RETRIES):
            folds = int(header.folds)
            histograms = _histograms(header.retired_latency, header.retired_latency_sum)
            for i in range(self.capacity):
                if self._slots[i].state != FREE:
                    slot = self._slots[i]
                    histograms = [a + b for a, b in zip(histograms, _histograms(slot.latency, slot.latency_sum))]
            if folds % 2 == 0 and int(header.folds) == folds:
                break
        return histograms

    def writer(self, index: int) -> SlotWriter:
        return SlotWriter(self._slots[index])

    def claim(self, index: int, number: int, generation: int) -> None:
        """Master: reserve a slot for a worker about to be forked."""
        slot = self._slots[index]
        ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(_Slot))
        slot.number, slot.generation, slot.state = number, generation, BOOTING
        slot.started = slot.last_tick = time.monotonic()

    def set_pid(self, index: int, pid: int) -> None:
        """Master: record the pid of the worker just forked into the slot."""
        self._slots[index].pid = pid

    def request_stop(self, index: int, mode: int, deadline: float, drain_mask: int = 0) -> None:
        """Master: tell the slot's worker how to stop, before signalling it.

        *deadline* (monotonic) is when it must be gone; *drain_mask* the listeners (bit = the
        worker's listener index) whose queue it answers in full before leaving, as on a stop
        of the whole service: listeners a reload removed, which no successor serves.
        """
        slot = self._slots[index]
        slot.stop_deadline, slot.drain_mask = deadline, drain_mask
        slot.stop_mode = mode

    def stop_mode(self, index: int) -> int:
        return int(self._slots[index].stop_mode)

    def release(self, index: int) -> None:
        """Master: the slot's worker is gone; its latency counts join the header's, the slot is reusable."""
        slot, header = self._slots[index], self._header
        header.folds += 1
        for i in range(_LATENCY_COUNTS):
            header.retired_latency[i] += slot.latency[i]
        for i in range(MAX_LISTENERS):
            header.retired_latency_sum[i] += slot.latency_sum[i]
        ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(_Slot))
        header.folds += 1

    def read(self, index: int) -> SlotView:
        slot = self._slots[index]
        # Workers run app code and can write any slot: times a reader computes with are finite.
        return SlotView(
            index, slot.pid, slot.generation, slot.number, slot.state, slot.requests, slot.active,
            _finite(slot.started), _finite(slot.request_started), _finite(slot.last_tick),
            slot.client.decode(errors="replace"), slot.listener.decode(errors="replace"),
            tuple(slot.by_listener), bool(slot.event_loop),
        )

    def slot_latency(self, index: int) -> list[Histogram]:
        """The latency histograms of one slot's worker, per listener counter (not in read(): the
        master reads every slot on each turn and needs none of them)."""
        slot = self._slots[index]
        return _histograms(slot.latency, slot.latency_sum)

    def used(self) -> list[SlotView]:
        """Snapshots of every slot that holds a worker."""
        return [self.read(i) for i in range(self.capacity) if self._slots[i].state != FREE]

    def close(self) -> None:
        """Unmap; the owner also removes the file."""
        self._slots = self._header = None  # type: ignore[assignment]
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()
        if self._owner and self.path:
            _unlink_if_same(self.path, self._inode)


class Tally:
    """Requests and their latency counted in the worker's own memory and added to its slot now
    and then (``SlotWriter.add_tally``): an event loop counts a request with three list stores
    and writes its slot on each tick of its loop, a quarter second apart.

    Indexes: ``served`` and ``sums`` by the listener's counter (below MAX_LISTENERS), ``counts``
    by ``counter * BUCKETS + bucket(seconds)``, as the slot's own histogram.
    """

    __slots__ = ("served", "counts", "sums")

    def __init__(self) -> None:
        self.served = [0] * MAX_LISTENERS
        self.counts = [0] * (MAX_LISTENERS * BUCKETS)
        self.sums = [0.0] * MAX_LISTENERS

    def clear(self) -> None:
        self.served[:] = [0] * MAX_LISTENERS
        self.counts[:] = [0] * (MAX_LISTENERS * BUCKETS)
        self.sums[:] = [0.0] * MAX_LISTENERS


# The word indexes of a slot's request counters, for SlotWriter.add_tally().
_REQUESTS_WORD = _Slot.requests.offset // 8
_BY_LISTENER_WORD = _Slot.by_listener.offset // 8


class SlotWriter:
    """The worker's handle on its own slot. Every method is a few memory stores."""

    __slots__ = ("_slot", "_by_listener", "_listener", "_counts", "_sums", "_words")

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot
        # Made once: each read of slot.by_listener builds a new ctypes array object.
        self._by_listener = slot.by_listener
        # Views over the latency fields: a memoryview's item store is cheaper than a ctypes array's.
        self._counts = memoryview(slot.latency).cast("B").cast("q")
        self._sums = memoryview(slot.latency_sum).cast("B").cast("d")
        # The whole slot as 64-bit words, for add_tally(): requests and by_listener are int64 fields.
        self._words = memoryview(slot).cast("B").cast("q")
        # The listener last written: most workers serve one, so it is written once.
        self._listener = b""

    def booted(self, pid: int) -> None:
        """The worker is ready to accept."""
        slot = self._slot
        slot.pid = pid
        slot.last_tick = time.monotonic()
        slot.state = IDLE

    def begin(self, client: bytes, listener: bytes) -> None:
        slot = self._slot
        slot.request_started = time.monotonic()
        slot.client = client[:_CLIENT_BYTES]
        if listener is not self._listener:
            slot.listener = listener[:_LISTENER_BYTES]
            self._listener = listener
        slot.state = BUSY

    def end(self, listener_index: int = 0) -> None:
        slot = self._slot
        slot.requests += 1
        self._by_listener[min(listener_index, MAX_LISTENERS - 1)] += 1
        slot.state = IDLE

    def observe(self, listener_index: int, seconds: float) -> None:
        """Count one request that took *seconds* in the listener's latency histogram.

        Two stores into the map, nothing allocated that outlives the call (tests/test_scoreboard.py);
        its time per request is measured by the master benchmark (`python -m loadtests.bench master`).
        """
        index = listener_index if listener_index < MAX_LISTENERS else MAX_LISTENERS - 1
        self._counts[index * BUCKETS + bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self._sums[index] += seconds

    def add_active(self, delta: int) -> None:
        self._slot.active += delta

    def tick(self) -> None:
        self._slot.last_tick = time.monotonic()

    def exiting(self) -> None:
        self._slot.state = EXITING

    # -- an event loop's slot (prefork.aioworker): many connections at once, one loop ----------
    # Its "current request" is the loop's current turn: the loop writes turned() on each tick,
    # BUSY while it holds connections. The slot says it is an event loop's (event_loop()), so
    # the master judges it by its tick, busy or idle: a loop blocked by a handler, a callback or
    # a background task stops turning, and the master's timeout aborts it as it does a hung request.

    def event_loop(self, running: bool) -> None:
        """An event loop serves in this worker from now (*running*), or no longer: its tick is the
        worker's liveness while it does."""
        self._slot.event_loop = int(running)

    def turned(self, busy: bool) -> None:
        """The event loop turned now; *busy*: it holds connections or running handlers."""
        slot = self._slot
        slot.last_tick = slot.request_started = time.monotonic()
        slot.state = BUSY if busy else IDLE

    def add_tally(self, tally: Tally) -> None:
        """Add what *tally* counted since the last call to the slot, and empty it."""
        words, counts, sums = self._words, self._counts, self._sums
        for index, served in enumerate(tally.served):
            if not served:
                continue
            words[_REQUESTS_WORD] += served
            words[_BY_LISTENER_WORD + index] += served
            sums[index] += tally.sums[index]
            for bucket in range(index * BUCKETS, (index + 1) * BUCKETS):
                if tally.counts[bucket]:
                    counts[bucket] += tally.counts[bucket]
        tally.clear()

    def describe(self, client: bytes, listener: bytes) -> None:
        """Name the client and listener the loop is on (the watchdog: the task that blocks it)."""
        self._slot.client = client[:_CLIENT_BYTES]
        self._slot.listener = listener[:_LISTENER_BYTES]

    @property
    def requests(self) -> int:
        return int(self._slot.requests)

    @property
    def stop_mode(self) -> int:
        return int(self._slot.stop_mode)

    @property
    def stop_deadline(self) -> float:
        return _finite(self._slot.stop_deadline)

    @property
    def drain_mask(self) -> int:
        return int(self._slot.drain_mask)


def _finite(value: float) -> float:
    """*value*, or 0.0 for NaN and infinities (a torn write, a stray store, a file of junk)."""
    return value if math.isfinite(value) else 0.0


def _histograms(counts: Any, sums: Any) -> list[Histogram]:
    flat = counts[:]
    return [from_counts(flat[i * BUCKETS:(i + 1) * BUCKETS], _finite(sums[i])) for i in range(MAX_LISTENERS)]


def _copy(buffer: mmap.mmap) -> bytearray:
    """A private copy of the map, taken again if the master folded a slot meanwhile (see latency)."""
    offset = _Header.folds.offset
    if len(buffer) < ctypes.sizeof(_Header):
        return bytearray(buffer)  # too short to be a scoreboard: _check_layout says so
    for _ in range(_FOLD_RETRIES):
        folds = struct.unpack_from("=q", buffer, offset)[0]
        data = bytearray(buffer)
        if folds % 2 == 0 and struct.unpack_from("=q", buffer, offset)[0] == folds:
            break
    return data


def _check_layout(path: str, data: bytearray) -> None:
    """ValueError unless *data* is a whole scoreboard of this version (the file is outside input)."""
    header_size = ctypes.sizeof(_Header)
    magic = bytes(data[: len(_MAGIC)])
    if magic.startswith(_MAGIC_PREFIX) and magic != _MAGIC:
        raise ValueError(f"{path} was written by another version of prefork (layout {magic.decode(errors='replace')}"
                         f", this prefork reads {_MAGIC.decode()}): use the prefork that started the master")
    if len(data) < header_size or magic != _MAGIC:
        raise ValueError(f"{path} is not a prefork scoreboard")
    capacity = _Header.from_buffer_copy(data[:header_size]).capacity
    if not 0 <= capacity <= _MAX_CAPACITY or len(data) != header_size + capacity * ctypes.sizeof(_Slot):
        raise ValueError(f"{path} is not a whole prefork scoreboard ({len(data)} bytes for {capacity} slots)")


def _write_header(buffer: mmap.mmap, capacity: int) -> None:
    header = _Header.from_buffer(buffer)
    header.magic, header.capacity = _MAGIC, capacity
    header.master_pid, header.master_started = os.getpid(), time.monotonic()
    del header  # a live ctypes view would keep close() from releasing the map


def _map_new_file(path: str, size: int, fill: Callable[[mmap.mmap], None]) -> mmap.mmap:
    """A shared map backed by a new file at *path* (mode 0644 less the umask: read by the CLI).

    The temporary file is created exclusively and never through a symbolic link: the master
    may run as root in a directory others can write to (the pidfile's, or /tmp for metrics).
    """
    fd, tmp = _create_exclusive(path)
    try:
        os.ftruncate(fd, size)
        buffer = mmap.mmap(fd, size, mmap.MAP_SHARED)
        fill(buffer)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return buffer


def _create_exclusive(path: str) -> tuple[int, str]:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(_CREATE_ATTEMPTS):
        tmp = f"{path}.{os.getpid()}.{attempt}.tmp"
        try:
            return os.open(tmp, flags, _FILE_MODE), tmp
        except FileExistsError:
            continue  # left by a crashed master of the same pid, or put there by someone else
    raise FileExistsError(f"cannot create a temporary file beside {path}: {_CREATE_ATTEMPTS} names are taken")


def _unlink_if_same(path: str, inode: int) -> None:
    """Remove *path* unless it was replaced (a new master after an upgrade writes its own)."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
