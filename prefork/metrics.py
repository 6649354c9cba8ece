"""Prometheus metrics read from the scoreboard, served by a small process of its own. Runs in: metrics.

The metrics process is a child of the master that is not a worker: the master forks it and it
calls ``run``, which serves ``GET /metrics`` until SIGTERM. The master's loop is never on a
scrape's path.

Rules:

1. Read, never write. Under a master, the process reads the scoreboard map it inherited: its
   own master's, even when an upgrade (USR2) has put the new master's file at the same path,
   and whatever the file's mode. Given a path instead (tests, tools), every scrape opens the
   file anew (``Scoreboard.open`` takes a private copy).
2. The ``worker`` label is the worker *number* (1, 2, ... as in process titles), not the pid: a
   replacement takes the smallest free number, so label values stay bounded by the pool's
   size, where pids would add a series per restart. While a worker is being replaced, the
   outgoing one and its successor can share a number; their values are then summed.
3. Request counters live in the slots of live workers: a replaced worker's count leaves with
   it and its successor starts from 0, which Prometheus's ``rate()`` and ``increase()`` read
   as a counter reset; the rate of all is the query
   ``sum by (listener) (rate(prefork_requests_total[5m]))``.
   The latency histogram ``prefork_request_duration_seconds`` (labels service, listener) is
   different: it is cumulative over the workers, and the master adds a departed worker's
   buckets to the scoreboard's header as it releases the slot, so it never goes down while the
   master lives. Its buckets are prefork.latency's; a quantile is the query
   ``histogram_quantile(0.99, sum by (le, listener) (rate(prefork_request_duration_seconds_bucket[5m])))``,
   the same definition as ``prefork status``'s p50 and p99. Its ``_count`` is the per-listener
   request total that survives replacements.
4. Every metric carries the ``service`` label.
5. Signals are taken with ``sigwait`` in the main thread, with SIGTERM, SIGINT, SIGQUIT and
   SIGUSR1 blocked in every thread: no handler ever runs, so nothing logs in one. SIGUSR1
   reopens the log files. The process also leaves when its parent (the master) is gone.
6. With ``user``/``group``, the process gives up root once its port is bound, as the workers do
   before they load the app: it serves HTTP, so it runs as the service's user. It then reads
   no USS of workers whose memory the kernel keeps from it (RSS and CPU remain).

The HTTP side is prometheus_client's own ``start_http_server``: a threaded server in a daemon
thread that already does content negotiation (OpenMetrics), gzip, HEAD, ``?name[]=`` filters
and IPv6. prefork's ``TCPServer`` with an ``http.server`` handler would need all that
rewritten plus a loop multiplexing signals; threads cost nothing here, as this process never
forks. Like prometheus_client's server, it answers every path with the metrics.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable, Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import CollectorRegistry

from prefork import log as prefork_log
from prefork.errors import ConfigError, ListenerError
from prefork.listeners import parse_bind
from prefork.procstats import ProcStats, stats
from prefork.latency import Histogram
from prefork.scoreboard import BUSY, MAX_LISTENERS, NO_DEPTH, RESTART_CAUSES, STATE_NAMES, MasterView, Scoreboard, SlotView

__all__ = ["ScoreboardCollector", "run"]

log = logging.getLogger("prefork.metrics")

# States a live worker can be in, each always exported (0 when empty) so series do not vanish.
WORKER_STATES = ("booting", "idle", "busy", "exiting")
# Signals that end run(); SIGUSR1 reopens the logs instead.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_HANDLED_SIGNALS = frozenset(_STOP_SIGNALS + (signal.SIGUSR1,))
# How often run() checks that its parent still lives, as a worker does on its tick.
PARENT_CHECK_INTERVAL = 1.0
# How long the HTTP thread gets to finish after shutdown(); it answers within one poll (0.5 s).
_JOIN_TIMEOUT = 5.0
# The scoreboard counts listeners past its last per-listener counter under that counter; with
# that many listeners, its label is this.
_OTHER_LISTENERS = "other"

# Reads one process's memory and CPU: procstats.stats with USS, or a fake in tests.
StatsReader = Callable[[int], ProcStats | None]


def run(bind: str, scoreboard: str | Scoreboard, listener_names: Sequence[str], service: str, *,
        ready: Callable[[tuple[str, int]], object] | None = None,
        drop_privileges: Callable[[], None] | None = None) -> None:
    """Serve the metrics on *bind* (tcp://HOST:PORT) until SIGTERM, SIGINT or SIGQUIT, then return.

    Called in the metrics process. *scoreboard* is the map inherited from the master, or the
    path of a scoreboard file. *listener_names* are in the order of the scoreboard's
    per-listener counters. *drop_privileges*, if given, is called once the port is bound.
    *ready*, if given, is called with the bound (host, port) once the server accepts (the port
    is the real one when *bind* asks for port 0). Raises ConfigError for a *bind* that is not
    tcp://, ListenerError when it cannot be bound.
    """
    host, port = _address(bind)
    parent = os.getppid()  # before anything can make us wait: the master may die at any time
    registry = CollectorRegistry()
    registry.register(ScoreboardCollector(scoreboard, listener_names, service))
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)  # before the thread starts
    try:
        _serve_until_stopped(bind, (host, port), registry, service, ready, parent, drop_privileges)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _address(bind: str) -> tuple[str, int]:
    spec = parse_bind(bind)
    if spec.scheme != "tcp":
        raise ConfigError(f"setting 'metrics_bind': {bind!r} is not allowed; expected tcp://HOST:PORT")
    host, port = spec.address
    return host, port


def _serve_until_stopped(bind: str, address: tuple[str, int], registry: CollectorRegistry, service: str,
                         ready: Callable[[tuple[str, int]], object] | None, parent: int,
                         drop_privileges: Callable[[], None] | None) -> None:
    try:
        server, thread = start_http_server(address[1], addr=address[0], registry=registry)
    except OSError as exc:
        raise ListenerError(f"{bind} (metrics_bind)", exc.strerror or str(exc)) from exc
    try:
        if drop_privileges is not None:
            drop_privileges()  # the port is bound: nothing left that needs root
        bound = (str(server.server_address[0]), int(server.server_address[1]))
        log.info("metrics of %s on http://%s/metrics", service, _host_port(*bound))
        if ready is not None:
            ready(bound)
        _wait_for_stop(parent)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_JOIN_TIMEOUT)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_for_stop(parent: int) -> None:
    """Return on a stop signal or when *parent* is gone; reopen the logs on SIGUSR1."""
    while True:
        info = signal.sigtimedwait(_HANDLED_SIGNALS, PARENT_CHECK_INTERVAL)
        if info is None:
            if os.getppid() != parent:
                log.warning("metrics: parent %d is gone, leaving", parent)
                return
        elif info.si_signo == signal.SIGUSR1:
            prefork_log.reopen()
        else:
            log.info("metrics: stopping on %s", signal.Signals(info.si_signo).name)
            return


class ScoreboardCollector:
    """A prometheus_client collector reading the scoreboard on every scrape: a live map, or a file."""

    def __init__(self, scoreboard: str | Scoreboard, listener_names: Sequence[str], service: str,
                 stats_of: StatsReader | None = None) -> None:
        self._board = scoreboard if isinstance(scoreboard, Scoreboard) else None
        self.path = scoreboard if isinstance(scoreboard, str) else (scoreboard.path or "(inherited map)")
        self.service = service
        self._listeners = _listener_labels(listener_names)
        self._stats_of = stats_of if stats_of is not None else _stats_with_uss

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read()
        up = GaugeMetricFamily("prefork_up", "1 when the scoreboard could be read, else 0",
                               labels=["service"])
        up.add_metric([self.service], 0 if snapshot is None else 1)
        yield up
        if snapshot is not None:
            yield from self._families(*snapshot)

    def describe(self) -> Iterator[Metric]:
        """The names this collector exports (samples omitted), for registry name checks."""
        yield GaugeMetricFamily("prefork_up", "")
        yield from _Families().all()

    def _read(self) -> tuple[MasterView, list[SlotView], list[Histogram]] | None:
        if self._board is not None:
            return self._board.master(), self._board.used(), self._board.latency()
        try:
            board = Scoreboard.open(self.path)
        except (OSError, ValueError) as exc:  # no master yet, or between an upgrade's two files
            log.warning("metrics: cannot read the scoreboard %s: %s", self.path, exc)
            return None
        try:
            return board.master(), board.used(), board.latency()
        finally:
            board.close()

    def _families(self, master: MasterView, slots: list[SlotView], latency: list[Histogram]) -> list[Metric]:
        families, service = _Families(), self.service
        for (number, listener), count in sorted(_requests_by_worker(slots, self._listeners).items()):
            families.requests.add_metric([service, str(number), listener], count)
        for state, count in _states(slots).items():
            families.workers.add_metric([service, state], count)
        families.busy.add_metric([service], sum(1 for slot in slots if slot.state == BUSY))
        for (number, kind), value in sorted(self._process_totals(slots).items()):
            if kind == "cpu":
                families.cpu.add_metric([service, str(number)], value)
            else:
                families.memory.add_metric([service, str(number), kind], value)
        for cause in RESTART_CAUSES:
            families.restarts.add_metric([service, cause], master.restarts.get(cause, 0))
        families.target.add_metric([service], master.target)
        families.generation.add_metric([service], master.generation)
        for listener, histogram in zip(self._listeners, latency):
            families.latency.add_metric([service, listener], histogram.cumulative(), histogram.total)
        for listener, depth in zip(master.listeners, master.queue_depth):
            if depth != NO_DEPTH:
                families.queue.add_metric([service, listener], depth)
        return families.all()

    def _process_totals(self, slots: Iterable[SlotView]) -> dict[tuple[int, str], float]:
        """rss, uss and cpu of each worker number, summed over the processes that share it."""
        totals: dict[tuple[int, str], float] = {}
        for slot in slots:
            reading = self._stats_of(slot.pid) if slot.pid > 0 else None
            if reading is None:
                continue  # not forked yet, or gone since the scoreboard was read
            for kind, value in (("rss", reading.rss), ("uss", reading.uss), ("cpu", reading.cpu_seconds)):
                if value is not None:
                    totals[slot.number, kind] = totals.get((slot.number, kind), 0) + value
        return totals


class _Families:
    """Every family but prefork_up, without samples until the collector adds them."""

    def __init__(self) -> None:
        worker = ["service", "worker"]
        self.requests = CounterMetricFamily(
            "prefork_requests", "requests served, by worker number and listener (from 0 again when "
            "a worker is replaced)", labels=worker + ["listener"])
        self.workers = GaugeMetricFamily("prefork_workers", "workers by state", labels=["service", "state"])
        self.busy = GaugeMetricFamily("prefork_busy_workers", "workers serving a request", labels=["service"])
        self.memory = GaugeMetricFamily(
            "prefork_worker_memory_bytes", "memory of each worker number: rss (resident, shared pages "
            "included) and uss (its own pages, when readable)", labels=worker + ["kind"])
        self.cpu = CounterMetricFamily("prefork_worker_cpu_seconds", "user and system CPU time of each "
                                       "worker number", labels=worker)
        self.restarts = CounterMetricFamily("prefork_worker_restarts", "workers replaced, by cause: exit, "
                                            "timeout, recycle, crash", labels=["service", "cause"])
        self.target = GaugeMetricFamily("prefork_pool_target_workers", "workers the master aims to run",
                                        labels=["service"])
        self.generation = GaugeMetricFamily("prefork_generation", "configuration generation (each reload "
                                            "adds one)", labels=["service"])
        self.latency = HistogramMetricFamily(
            "prefork_request_duration_seconds", "time from a handler's start to its end, by listener, over "
            "every worker since the master started", labels=["service", "listener"])
        self.queue = GaugeMetricFamily("prefork_listen_queue_depth", "connections waiting in a stream "
                                       "listener's accept queue (the kernel's figure; Recv-Q in ss -lnt)",
                                       labels=["service", "listener"])

    def all(self) -> list[Metric]:
        return [self.requests, self.workers, self.busy, self.memory, self.cpu, self.restarts, self.target,
                self.generation, self.latency, self.queue]


def _listener_labels(names: Sequence[str]) -> list[str]:
    """The label of each per-listener counter: the scoreboard counts listeners past its last
    counter under that counter, so with too many listeners the last label says "other"."""
    labels = [str(name) for name in names[:MAX_LISTENERS]]
    if len(names) > MAX_LISTENERS:
        labels[-1] = _OTHER_LISTENERS
    return labels


def _requests_by_worker(slots: Iterable[SlotView], listeners: Sequence[str]) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for slot in slots:
        for listener, count in zip(listeners, slot.by_listener):
            counts[slot.number, listener] = counts.get((slot.number, listener), 0) + count
    return counts


def _states(slots: Iterable[SlotView]) -> dict[str, int]:
    counts = dict.fromkeys(WORKER_STATES, 0)
    for slot in slots:
        name = STATE_NAMES.get(slot.state)
        if name in counts:
            counts[name] += 1
    return counts


def _stats_with_uss(pid: int) -> ProcStats | None:
    return stats(pid, with_uss=True)
