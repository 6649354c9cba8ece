"""The servers that loadtests/bench_master.py measures. Runs in: the benchmark's server processes.

Started only by the benchmark (``.venv/bin/python -m loadtests.bench_master``), each in its own
session so that the benchmark can kill the whole process group, as:

    python -m loadtests.bench_master_servers prefork OPTIONS_JSON
    python -m loadtests.bench_master_servers naive OPTIONS_JSON

``prefork`` runs a real prefork master (``prefork.serve``) with the settings in OPTIONS_JSON
plus ``app`` (default: ``PidEcho`` below). ``naive`` is the pre-forking server people write by
hand: one stdlib ``socketserver.TCPServer``, then ``os.fork()`` N times, every child running the
stdlib ``serve_forever()`` on the shared listening socket. Both write ``{"pid", "host", "port"}``
to OPTIONS_JSON's ``ready_file`` once they serve (the port was bound to 0 and is read back).

Both stop by themselves after ``lifetime`` seconds (SIGALRM, default action), so nothing
outlives a benchmark that was itself killed; prefork workers follow their master
(PR_SET_PDEATHSIG), naive children get their own alarm.

The echo protocol, identical for both: a client sends one line and gets back
``b"<pid of the worker> <line>"``; the worker then closes the connection. A first line ``hold``
is answered the same way but the connection stays open (every further line answered) until the
client closes it, which keeps that worker busy: the benchmark uses it to steer connections to
the other workers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socketserver as stdlib_socketserver
import sys
from typing import Any

import prefork
from prefork.config import make_settings
from prefork.handlers import StreamRequestHandler

__all__ = ["NaiveEcho", "PidEcho", "main"]

# Seconds a server process lives at most, whatever happens to the benchmark.
DEFAULT_LIFETIME = 300


def echo(rfile: io.BufferedIOBase, wfile: io.BufferedIOBase) -> None:
    """Serve one connection: answer one line, or every line after ``hold``."""
    prefix = str(os.getpid()).encode() + b" "
    line = rfile.readline()
    if not line:
        return
    wfile.write(prefix + line)
    if line.rstrip(b"\n") != b"hold":
        return
    for line in rfile:
        wfile.write(prefix + line)


class PidEcho(StreamRequestHandler):
    """The benchmark's echo on prefork's handler classes."""

    def handle(self) -> None:
        echo(self.rfile, self.wfile)


class NaiveEcho(stdlib_socketserver.StreamRequestHandler):
    """The same echo on the standard library's handler classes."""

    def handle(self) -> None:
        echo(self.rfile, self.wfile)


def write_ready(path: str, host: str, port: int) -> None:
    """Publish where we serve, atomically (the benchmark polls for the file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": host, "port": port}, f)
    os.replace(tmp, path)


def run_prefork(options: dict[str, Any]) -> int:
    """A real prefork master; returns its exit code."""
    ready_file = options.pop("ready_file")
    app = options.pop("app", PidEcho)

    def when_ready(arbiter: Any) -> None:
        host, port = arbiter.listeners[0].sock.getsockname()[:2]
        write_ready(ready_file, str(host), int(port))

    settings = make_settings({"bind": ["tcp://127.0.0.1:0"], **options, "when_ready": when_ready})
    return prefork.serve(app, settings=settings)


def run_naive(options: dict[str, Any]) -> int:
    """The hand-written pre-fork: one stdlib server, forked; returns when every child is gone."""
    server = stdlib_socketserver.TCPServer(("127.0.0.1", 0), NaiveEcho)
    children = [_fork_naive_child(server, options["lifetime"]) for _ in range(options["workers"])]
    host, port = server.server_address[:2]
    write_ready(options["ready_file"], str(host), int(port))
    server.server_close()
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def _fork_naive_child(server: stdlib_socketserver.TCPServer, lifetime: int) -> int:
    """Called before fork, in the naive parent; the child serves until killed or its alarm."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        signal.alarm(lifetime)  # alarms are not inherited across fork
        server.serve_forever()
        status = 0
    finally:
        os._exit(status)


def main(argv: list[str] | None = None) -> int:
    role, raw = (argv if argv is not None else sys.argv[1:])[:2]
    options = json.loads(raw)
    lifetime = int(options.pop("lifetime", DEFAULT_LIFETIME))
    signal.alarm(lifetime)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    if role == "naive":
        return run_naive({**options, "lifetime": lifetime})
    return run_prefork(options)


if __name__ == "__main__":
    sys.exit(main())
