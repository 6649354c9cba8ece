"""Every server class x its handler kinds x sync / threading / forking, on real sockets."""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path

import pytest

import prefork.socketserver as socketserver
from tests.core.util import LOCALHOST, server_class
from tests.support import datagram_request, serving, stream_request

FAMILIES = ["TCP", "UDP", "UnixStream", "UnixDatagram"]
MODES = ["sync", "Threading", "Forking"]
HANDLER_KINDS = ["raw", "files"]  # BaseRequestHandler on the raw request / the rfile-wfile class
SERVE_THREAD = "serve_forever"  # the thread name tests.support.serving() gives its thread


def reply(data: bytes) -> bytes:
    """Upper-case the payload and say which process and thread served it."""
    where = "%d|%s" % (os.getpid(), threading.current_thread().name)
    return data.strip().upper() + b"|" + where.encode()


class RawStream(socketserver.BaseRequestHandler):
    def handle(self):
        data = b""
        while not data.endswith(b"\n") and (chunk := self.request.recv(1024)):
            data += chunk
        self.request.sendall(reply(data))


class FileStream(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(reply(self.rfile.readline()))


class RawDatagram(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(reply(data), self.client_address)


class FileDatagram(socketserver.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(reply(self.rfile.readline()))


HANDLERS = {
    ("stream", "raw"): RawStream,
    ("stream", "files"): FileStream,
    ("dgram", "raw"): RawDatagram,
    ("dgram", "files"): FileDatagram,
}


def is_datagram(family: str) -> bool:
    return family in ("UDP", "UnixDatagram")


def address_for(family: str, sock_dir: Path):
    return str(sock_dir / "srv.sock") if family.startswith("Unix") else LOCALHOST


def ask(family: str, server, sock_dir: Path, payload: bytes) -> bytes:
    """One request in the way a client of *family* makes it."""
    af = socket.AF_UNIX if family.startswith("Unix") else socket.AF_INET
    if not is_datagram(family):
        return stream_request(server.server_address, payload, family=af)
    # A Unix datagram client must bind a path of its own, or the reply has nowhere to go.
    bind = str(sock_dir / "cli.sock") if af == socket.AF_UNIX else None
    return datagram_request(server.server_address, payload, family=af, bind=bind)


def check_served_in_mode(mode: str, pid: int, thread_name: str) -> None:
    if mode == "Forking":
        assert pid != os.getpid()
    else:
        assert pid == os.getpid()
        assert (thread_name == SERVE_THREAD) == (mode == "sync")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", HANDLER_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_request_served_and_server_closed(family, kind, mode, sock_dir):
    handler = HANDLERS[("dgram" if is_datagram(family) else "stream", kind)]
    server = server_class(family, mode)(address_for(family, sock_dir), handler)
    with serving(server):
        answer = ask(family, server, sock_dir, b"hello matrix\n")
    text, pid, thread_name = answer.split(b"|", 2)
    assert text == b"HELLO MATRIX"
    check_served_in_mode(mode, int(pid), thread_name.decode())
    assert server.socket.fileno() == -1
    if mode == "Forking":
        assert not server.active_children  # server_close waited for and reaped the child


@pytest.mark.parametrize("family", FAMILIES)
def test_class_composition(family):
    # The classes under test really are the stdlib-shaped compositions.
    assert issubclass(server_class(family, "Threading"), socketserver.ThreadingMixIn)
    assert issubclass(server_class(family, "Forking"), socketserver.ForkingMixIn)
    assert issubclass(server_class(family, "sync"), socketserver.BaseServer)


class Options(socketserver.StreamRequestHandler):
    """Reports what StreamRequestHandler's class options did to the connection and files."""

    def handle(self):
        line = self.rfile.readline()
        nodelay = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.wfile.write(b"%s %r %d %s %s" % (
            line.strip(), self.connection.gettimeout(), bool(nodelay),
            type(self.rfile).__name__.encode(),
            b"buffered" if isinstance(self.wfile, io.BufferedWriter) else b"direct",
        ))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, b"x None 0 BufferedReader direct"),
        ({"rbufsize": 0, "wbufsize": -1}, b"x None 0 SocketIO buffered"),
        ({"timeout": 4.0, "disable_nagle_algorithm": True}, b"x 4.0 1 BufferedReader direct"),
    ],
    ids=["defaults", "unbuffered_read_buffered_write", "timeout_and_nodelay"],
)
def test_stream_handler_options(options, expected):
    # The same class options give the same files as the stdlib's StreamRequestHandler; a
    # buffered wfile is flushed by finish().
    handler = type("Handler", (Options,), options)
    with serving(socketserver.TCPServer(LOCALHOST, handler)) as server:
        assert stream_request(server.server_address, b"x\n") == expected
