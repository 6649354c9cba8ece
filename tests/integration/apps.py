"""Apps that integration tests run in real masters. Each line a client sends is a command."""

from __future__ import annotations

import os
import sys
import threading
import time

from prefork.handlers import DatagramRequestHandler, StreamRequestHandler

# The process that imported this module: the master with preload, else each worker.
IMPORTED_IN = os.getpid()

# Grows in the worker when told to, for max_worker_memory tests.
_BALLAST: list[bytes] = []


def answer(command: bytes) -> bytes:
    """The reply to one command line (without its newline)."""
    verb, _, arg = command.partition(b" ")
    if verb == b"pid":
        return str(os.getpid()).encode()
    if verb == b"imported-in":
        return str(IMPORTED_IN).encode()
    if verb == b"thread":
        return threading.current_thread().name.encode()
    if verb == b"uid":
        return str(os.getuid()).encode()
    if verb == b"sleep":
        time.sleep(float(arg))
        return b"slept"
    if verb == b"raise":
        raise RuntimeError("the handler failed on purpose")
    if verb == b"exit":
        sys.exit(3)
    if verb == b"_exit":
        os._exit(4)
    if verb == b"touch":
        with open(arg, "w"):
            pass
        return oct(os.stat(arg).st_mode & 0o777).encode()
    if verb == b"grow":
        _BALLAST.append(b"x" * int(arg))
        return str(sum(map(len, _BALLAST))).encode()
    return command


class StreamHandler(StreamRequestHandler):
    """Answers each line until the client closes."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(answer(line.rstrip(b"\n")) + b"\n")


class DatagramHandler(DatagramRequestHandler):
    """Answers each datagram."""

    def handle(self) -> None:
        self.wfile.write(answer(self.rfile.read().rstrip(b"\n")))
