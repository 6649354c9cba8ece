"""A service whose import builds a ~100 MB graph of small Python objects. Runs in: worker, or master with preload.

Used by the copy-on-write part of ``loadtests/suites/master.py`` (run it as
``.venv/bin/python -m loadtests.bench master``); it is not meant to be started by hand, but
``prefork run loadtests.bigapp --bind tcp://127.0.0.1:0`` would serve it.

The graph is what a real app drags in at import time (tables, caches, ORM metadata): many small
objects, about half of the bytes in containers that the cyclic garbage collector tracks (dicts,
lists) and half in objects it does not (str, float). A full collection writes to the header of
every tracked container, which is what un-shares copy-on-write pages after fork unless the
objects were moved out of the collector's reach with ``gc.freeze()`` before forking.

Commands, one per line, each answered on one line (the connection stays open until the client
closes it, so a client holding one keeps that worker busy):

- ``gc``: run a full ``gc.collect()``, then answer the pid;
- ``size``: the growth of this process's RSS while the graph was built, in bytes;
- anything else: the pid of the process that answered.
"""

from __future__ import annotations

import gc
import os

from prefork.handlers import StreamRequestHandler

__all__ = ["GRAPH", "GRAPH_BYTES", "StreamHandler", "unfreeze"]

# About 540 bytes per record on CPython 3.11 (a 4-key dict, a 2-item list, three short str and a
# float), so this many records make ~100 MiB.
RECORDS = 195_000

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def build(records: int) -> list[dict[str, object]]:
    """The graph: *records* small dicts, each with its own list and strings."""
    return [{"id": i, "name": f"user-{i}", "tags": [f"t{i}", f"g{i}"], "score": float(i)}
            for i in range(records)]


_before = _rss()
GRAPH = build(RECORDS)
GRAPH_BYTES = _rss() - _before

def unfreeze(worker: object) -> None:
    """A post_fork hook: undo the master's gc.freeze() in this worker (the "no freeze" case).

    prefork has no setting to skip the freeze that ``preload`` does, so the benchmark measures
    "preload without freeze" by moving the frozen objects back into the oldest generation right
    after fork, before the worker serves: the same state as a master that never froze.
    """
    gc.unfreeze()


def answer(command: bytes) -> bytes:
    if command == b"gc":
        gc.collect()
    if command == b"size":
        return str(GRAPH_BYTES).encode()
    return str(os.getpid()).encode()


class StreamHandler(StreamRequestHandler):
    """Answers each line until the client closes."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(answer(line.rstrip(b"\n")) + b"\n")
