"""Every server the benchmarks measure, and the handlers they run. Runs in: the servers under test.

Started only by the harness (``loadtests/harness.py``), each in a session of its own, as
``python -m loadtests.servers ROLE LIFETIME READY_FILE ARGS...``; every role stops by itself after
LIFETIME seconds (SIGALRM, whose default action ends the process; prefork's workers follow their
master by PR_SET_PDEATHSIG, gunicorn's by checking their parent, forked stdlib children get their
own alarm). Roles:

- ``stdlib OPTIONS_JSON``: a server class of the stdlib's ``socketserver`` (or, for the core's
  comparison, of ``prefork.socketserver``: ``module``) with one of ``HANDLERS``, on 127.0.0.1
  port 0; ``forks`` > 0 makes it the pre-forking server people write by hand (the server forked
  N times, every child in ``serve_forever()`` on the shared socket); ``backlog`` replaces
  ``request_queue_size``. It writes ``{"pid", "port"}`` to READY_FILE once it listens.
- ``prefork OPTIONS_JSON``: a real master (``prefork.serve``) with those settings plus ``app``
  (default: ``PidEcho``); it writes READY_FILE from ``when_ready``.
- ``prefork-cli ARGS`` and ``gunicorn ARGS``: that program's own command line in this process,
  with ``when_ready`` (below) as its when-ready hook (gunicorn reads it from this module, its
  ``-c python:`` config), which writes READY_FILE with the TCP and UDP ports.
- ``granian ARGS``: granian's command line in this process; it has no such hook, so the harness
  finds its port on the listening socket.

The handlers, each written once and put on each implementation's base class, so that rows compare
runtimes and not handlers:

- ``echo``: every line back until the client closes (the comparison's raw rows);
- ``one-line``: one line back, then close (the core's CPU benchmark);
- ``pid``: ``b"<pid of the worker> <line>"``, then close; a first line ``hold`` keeps the
  connection (every further line answered) until the client closes it, which keeps that worker
  busy: the master's benchmark steers connections with it;
- ``hello``: ``http.server`` answering the bytes of ``workers.wsgi:hello`` with keep-alive.

Handlers have no timeout on purpose (a timeout adds a poll() to every read); the lifetime bounds them.
"""

from __future__ import annotations

import http.server
import importlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from prefork.handlers import DatagramRequestHandler, StreamRequestHandler

__all__ = ["StreamHandler", "DatagramHandler", "PidEcho", "HELLO", "when_ready", "main"]

# The body of workers.wsgi:hello, so that the stdlib HTTP row answers the same bytes.
HELLO = b"Hello, World!\n"
# Where the command-line roles' when_ready finds READY_FILE (the hook runs in another module instance).
READY_ENV = "LOADTESTS_READY_FILE"
# The core's handler reads at most this much: the client never sends more than one short line.
MAX_LINE = 1024


def echo_stream(self: Any) -> None:
    """Send back every line until the client closes."""
    for line in iter(self.rfile.readline, b""):
        self.wfile.write(line)


def echo_datagram(self: Any) -> None:
    """Send the datagram back."""
    self.wfile.write(self.rfile.read())


def echo_one_line(self: Any) -> None:
    """Read one line, write it back."""
    self.wfile.write(self.rfile.readline(MAX_LINE))


def echo_pid(self: Any) -> None:
    """Answer one line, or every line after ``hold``, prefixed with this worker's pid."""
    prefix = str(os.getpid()).encode() + b" "
    line = self.rfile.readline()
    if line:
        self.wfile.write(prefix + line)
    if line.rstrip(b"\n") == b"hold":
        for line in self.rfile:
            self.wfile.write(prefix + line)


def _on(base: type, body: Any) -> type:
    return type(f"{body.__name__}_{base.__module__.replace('.', '_')}", (base,), {"handle": body})


# The prefork service of the comparison (`prefork run loadtests.servers`) and the master's echo.
StreamHandler = _on(StreamRequestHandler, echo_stream)
DatagramHandler = _on(DatagramRequestHandler, echo_datagram)
PidEcho = _on(StreamRequestHandler, echo_pid)


class HelloHandler(http.server.BaseHTTPRequestHandler):
    """The stdlib HTTP row: workers.wsgi:hello's response, HTTP/1.1 keep-alive, no logging."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(HELLO)))
        self.end_headers()
        self.wfile.write(HELLO)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # gunicorn and prefork log no access line by default either


HANDLERS = {"echo": echo_stream, "datagram": echo_datagram, "one-line": echo_one_line, "pid": echo_pid}


def write_ready(path: str, port: int, udp_port: int = 0) -> None:
    """Publish the ports atomically (the harness polls for the file)."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as file:
        json.dump({"pid": os.getpid(), "port": port, "udp_port": udp_port or port}, file)
    os.replace(f"{path}.tmp", path)


def when_ready(master: Any) -> None:
    """The command-line roles' hook, in prefork's or gunicorn's master: their ports in READY_FILE."""
    ports = {s.sock.type: s.sock.getsockname()[1] for s in getattr(master, "listeners", None) or master.LISTENERS}
    write_ready(os.environ[READY_ENV], ports.get(socket.SOCK_STREAM, 0), ports.get(socket.SOCK_DGRAM, 0))


def make_stdlib(options: dict[str, Any]) -> Any:
    """The server of role ``stdlib``: *options* ``server``, ``handler``, ``module``, ``backlog``."""
    if options["server"] == "ThreadingHTTPServer":
        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), HelloHandler)
    module = importlib.import_module(options.get("module", "socketserver"))
    server_class = getattr(module, options["server"])
    if options.get("backlog"):
        server_class = type(server_class.__name__, (server_class,), {"request_queue_size": options["backlog"]})
    base = module.DatagramRequestHandler if options["handler"] == "datagram" else module.StreamRequestHandler
    return server_class(("127.0.0.1", 0), _on(base, HANDLERS[options["handler"]]))


def run_stdlib(options: dict[str, Any], ready_file: str, lifetime: int) -> int:
    server = make_stdlib(options)
    children = [_fork_child(server, lifetime) for _ in range(options.get("forks", 0))]
    write_ready(ready_file, server.server_address[1])
    if children:
        server.server_close()
        for pid in children:
            os.waitpid(pid, 0)
        return 0
    with server:
        server.serve_forever()
    return 0


def _fork_child(server: Any, lifetime: int) -> int:
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


def run_prefork(options: dict[str, Any], ready_file: str) -> int:
    """A real prefork master; returns its exit code."""
    import prefork
    from prefork.config import make_settings

    app = options.pop("app", PidEcho)

    def when_ready(arbiter: Any) -> None:
        write_ready(ready_file, int(arbiter.listeners[0].sock.getsockname()[1]))

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    settings = make_settings({"bind": ["tcp://127.0.0.1:0"], **options, "when_ready": when_ready})
    return prefork.serve(app, settings=settings)


def run_cli(program: str, argv: list[str], ready_file: str) -> int:
    """``prefork``, ``gunicorn`` or ``granian``'s own command line, in this process, with ``when_ready``."""
    os.environ[READY_ENV] = ready_file
    if program == "prefork-cli":
        from prefork.cli import main as prefork_main
        return prefork_main([argv[0], "--when-ready", "loadtests.servers:when_ready", *argv[1:]])
    if program == "granian":
        from granian.cli import entrypoint  # type: ignore[import-not-found,unused-ignore]
        sys.argv = ["granian", *argv]
        entrypoint()  # type: ignore[no-untyped-call,unused-ignore]
        return 0
    from gunicorn.app.wsgiapp import run  # type: ignore[import-untyped]
    sys.argv = ["gunicorn", "-c", "python:loadtests.servers", *argv]
    run()
    return 0


def main(argv: list[str] | None = None) -> int:
    role, lifetime, ready_file, *rest = sys.argv[1:] if argv is None else argv
    signal.alarm(int(lifetime))  # no server here handles SIGALRM: its default action ends it
    if role in ("prefork-cli", "gunicorn", "granian"):
        return run_cli(role, rest, ready_file)
    options = json.loads(rest[0])
    if role == "prefork":
        return run_prefork(options, ready_file)
    if role == "uvloop":  # the asyncio suite's reference (loadtests/uvloop_echo.py)
        from loadtests.uvloop_echo import run_uvloop
        return run_uvloop(options, ready_file)
    return run_stdlib(options, ready_file, int(lifetime))


if __name__ == "__main__":
    sys.exit(main())
