"""The servers that loadtests/bench.py compares, and the one echo handler they all run. Runs in: bench servers.

The echo handler's body is written once (``echo_stream``, ``echo_datagram``) and put on each
implementation's base class, so every row runs the same handler code and rows compare runtimes:

- as a prefork service: ``prefork run loadtests.bench_servers --bind ...`` (this module has the
  service's ``StreamHandler`` and ``DatagramHandler``, on prefork's handler classes);
- ``python -m loadtests.bench_servers prefork|gunicorn LIFETIME ARGS...``: that program's own
  command line, in this process, ended by SIGALRM after LIFETIME seconds (workers follow their
  master: prefork's by PR_SET_PDEATHSIG, gunicorn's by checking their parent);
- as a stdlib server: ``python -m loadtests.bench_servers ROLE READY_FILE LIFETIME [WORKERS]``,
  ROLE one of ``STDLIB_ROLES``; the server binds 127.0.0.1 port 0 and writes
  ``{"pid", "port"}`` to READY_FILE once it listens.

``naive-prefork`` is the pre-forking server people write by hand: one stdlib ``TCPServer``,
forked WORKERS times, every child in ``serve_forever()`` on the shared socket. ``stdlib-http``
is ``http.server.ThreadingHTTPServer`` answering the same bytes as ``workers.wsgi:hello``, with
HTTP/1.1 keep-alive. Every stdlib server stops by itself after LIFETIME seconds (SIGALRM's
default action), so nothing outlives a benchmark that was killed.

Handlers have no timeout on purpose (a timeout makes every read a poll() plus a recv(), a path
the default handler never takes); the lifetime bounds them instead.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socketserver as stdlib_socketserver
import sys
from typing import Any

from prefork.handlers import DatagramRequestHandler, StreamRequestHandler

__all__ = ["StreamHandler", "DatagramHandler", "STDLIB_ROLES", "HELLO", "main"]

# The body of workers.wsgi:hello, so that the stdlib HTTP row answers the same bytes.
HELLO = b"Hello, World!\n"


def echo_stream(self: Any) -> None:
    """Send back every line until the client closes: the stream handler of every row."""
    for line in iter(self.rfile.readline, b""):
        self.wfile.write(line)


def echo_datagram(self: Any) -> None:
    """Send the datagram back: the datagram handler of every row."""
    self.wfile.write(self.rfile.read())


# The prefork service (`prefork run loadtests.bench_servers`).
StreamHandler = type("StreamHandler", (StreamRequestHandler,), {"handle": echo_stream})
DatagramHandler = type("DatagramHandler", (DatagramRequestHandler,), {"handle": echo_datagram})

# The same bodies on the stdlib's classes.
StdlibStream = type("StdlibStream", (stdlib_socketserver.StreamRequestHandler,), {"handle": echo_stream})
StdlibDatagram = type("StdlibDatagram", (stdlib_socketserver.DatagramRequestHandler,), {"handle": echo_datagram})


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


STDLIB_ROLES: dict[str, tuple[type, type]] = {
    "stdlib-tcp": (stdlib_socketserver.TCPServer, StdlibStream),
    "stdlib-threading-tcp": (stdlib_socketserver.ThreadingTCPServer, StdlibStream),
    "stdlib-forking-tcp": (stdlib_socketserver.ForkingTCPServer, StdlibStream),
    "naive-prefork": (stdlib_socketserver.TCPServer, StdlibStream),
    "stdlib-udp": (stdlib_socketserver.UDPServer, StdlibDatagram),
    "stdlib-threading-udp": (stdlib_socketserver.ThreadingUDPServer, StdlibDatagram),
    "stdlib-http": (http.server.ThreadingHTTPServer, HelloHandler),
}


def write_ready(path: str, port: int) -> None:
    """Publish the port atomically (the benchmark polls for the file)."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as file:
        json.dump({"pid": os.getpid(), "port": port}, file)
    os.replace(f"{path}.tmp", path)


def run_naive(server: Any, workers: int, ready_file: str, lifetime: int) -> int:
    """Fork *workers* children serving the shared socket; wait for them (called before fork)."""
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # called in the child: serve until killed or the alarm
            signal.alarm(lifetime)  # alarms are not inherited across fork
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    write_ready(ready_file, server.server_address[1])
    server.server_close()
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def run_cli(program: str, lifetime: int, argv: list[str]) -> int:
    """``prefork`` or ``gunicorn``'s own command line, in this process, under a lifetime alarm."""
    signal.alarm(lifetime)  # neither master handles SIGALRM: its default action ends the master
    if program == "prefork":
        from prefork.cli import main as prefork_main
        return prefork_main(argv)
    from gunicorn.app.wsgiapp import run
    sys.argv = ["gunicorn", *argv]
    run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[0] in ("prefork", "gunicorn"):
        return run_cli(args[0], int(args[1]), args[2:])
    role, ready_file, lifetime = args[0], args[1], int(args[2])
    workers = int(args[3]) if len(args) > 3 else 1
    signal.alarm(lifetime)
    server_class, handler = STDLIB_ROLES[role]
    server = server_class(("127.0.0.1", 0), handler)
    if role == "naive-prefork":
        return run_naive(server, workers, ready_file, lifetime)
    write_ready(ready_file, server.server_address[1])
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
