"""Helpers shared by the core's tests: server classes by name, children, clients."""

from __future__ import annotations

import linecache
import os
import select
import socket
import sys
import threading
from typing import Any

import psutil

import prefork.socketserver as socketserver
from tests.support import SOCKET_TIMEOUT

LOCALHOST = ("127.0.0.1", 0)


def server_class(family: str, mode: str) -> type:
    """The server class for *family* (TCP, UDP, UnixStream, UnixDatagram) in *mode*.

    *mode* is "sync", "Threading" or "Forking". Ready-made classes are taken from the facade;
    where the running Python lacks one (Forking Unix servers before 3.12) it is composed the
    way the stdlib composes its own.
    """
    base = getattr(socketserver, family + "Server")
    if mode == "sync":
        return base
    ready = getattr(socketserver, mode + family + "Server", None)
    if ready is not None:
        return ready
    mixin = getattr(socketserver, mode + "MixIn")
    return type(mode + family + "Server", (mixin, base), {})


def live_children() -> list[psutil.Process]:
    """This process's direct children that are running (zombies do not count)."""
    alive = []
    for proc in psutil.Process().children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exists(pid: int) -> bool:
    """True while *pid* exists at all (running or a zombie not yet reaped)."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    return True


def connect(address: Any, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(SOCKET_TIMEOUT)
    sock.connect(address)
    return sock


def readable(sock: Any, timeout: float) -> bool:
    """Whether *sock* becomes readable within *timeout* seconds (a bounded negative check)."""
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)


def read_line(sock: socket.socket) -> bytes:
    """Read up to and including the next newline (or until EOF)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def reap(pid: int) -> int:
    """Wait for our own child *pid* and return its exit code."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def waiting_for_requests(thread: threading.Thread) -> bool:
    """Whether *thread* (running serve_forever) is inside the loop's wait for readiness.

    White-box on purpose: a test that measures how fast shutdown() wakes the loop must call
    it while the loop sleeps, not in the instants between two turns.
    """
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    if frame is None or frame.f_code.co_name not in ("wait", "serve_forever"):
        return False
    # The innermost Python frame sits on the line that calls the (C) wait of the poller.
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    return "wait(" in line
