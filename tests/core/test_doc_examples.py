"""The examples of the stdlib socketserver documentation, ported and run on prefork.socketserver.

Each server and client below follows the documented example; the assertions check the output
the documentation shows ("Sent: hello world" / "Received: HELLO WORLD", the server printing
who wrote what, and the threaded example's "Thread-N: Hello World i" replies).
"""

from __future__ import annotations

import os
import re
import socket
import threading

import pytest

import prefork.socketserver as socketserver
from tests.support import SOCKET_TIMEOUT, serving

HOST = "127.0.0.1"


class UpperRecvHandler(socketserver.BaseRequestHandler):
    """The documented TCP handler working on the raw socket."""

    def handle(self):
        self.data = self.request.recv(1024).strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        self.request.sendall(self.data.upper())


class UpperStreamHandler(socketserver.StreamRequestHandler):
    """The documented alternative: file-like rfile and wfile."""

    def handle(self):
        self.data = self.rfile.readline().strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        self.wfile.write(self.data.upper())


class UpperUDPHandler(socketserver.BaseRequestHandler):
    """The documented UDP handler: request is (data, socket)."""

    def handle(self):
        data = self.request[0].strip()
        sock = self.request[1]
        print("{} wrote:".format(self.client_address[0]))
        print(data)
        sock.sendto(data.upper(), self.client_address)


def tcp_client(address, data: str) -> list[str]:
    """The documented TCP client; returns the lines it would print."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(address)
        sock.sendall(bytes(data + "\n", "utf-8"))
        received = str(sock.recv(1024), "utf-8")
    return ["Sent:     {}".format(data), "Received: {}".format(received)]


def udp_client(address, data: str) -> list[str]:
    """The documented UDP client."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.sendto(bytes(data + "\n", "utf-8"), address)
        received = str(sock.recv(1024), "utf-8")
    return ["Sent:     {}".format(data), "Received: {}".format(received)]


@pytest.mark.parametrize("handler", [UpperRecvHandler, UpperStreamHandler])
def test_upper_casing_tcp_server(handler, capsys):
    with socketserver.TCPServer((HOST, 0), handler) as server:
        with serving(server):
            lines = tcp_client(server.server_address, "hello world")
    assert lines == ["Sent:     hello world", "Received: HELLO WORLD"]
    assert capsys.readouterr().out == "127.0.0.1 wrote:\nb'hello world'\n"


def test_upper_casing_udp_server(capsys):
    with socketserver.UDPServer((HOST, 0), UpperUDPHandler) as server:
        with serving(server):
            lines = udp_client(server.server_address, "hello world")
    assert lines == ["Sent:     hello world", "Received: HELLO WORLD"]
    assert capsys.readouterr().out == "127.0.0.1 wrote:\nb'hello world'\n"


class ThreadedTCPRequestHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data = str(self.request.recv(1024), "ascii")
        cur_thread = threading.current_thread()
        response = bytes("{}: {}".format(cur_thread.name, data), "ascii")
        self.request.sendall(response)


class ThreadedTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    pass


class ForkingTCPRequestHandler(socketserver.BaseRequestHandler):
    """The threaded example's handler, answering with the serving process's pid instead."""

    def handle(self):
        data = str(self.request.recv(1024), "ascii")
        response = bytes("{}: {}".format(os.getpid(), data), "ascii")
        self.request.sendall(response)


class ForkingTCPServer(socketserver.ForkingMixIn, socketserver.TCPServer):
    pass


def client(ip: str, port: int, message: str) -> str:
    """The documented client of the threaded example."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect((ip, port))
        sock.sendall(bytes(message, "ascii"))
        response = str(sock.recv(1024), "ascii")
    return "Received: {}".format(response)


def run_example(server_cls, handler) -> tuple[str, list[str]]:
    """The main block of the threaded example: server loop in a thread, three clients."""
    server = server_cls((HOST, 0), handler)
    with server:
        ip, port = server.server_address
        server_thread = threading.Thread(target=server.serve_forever)
        server_thread.daemon = True
        server_thread.start()
        try:
            replies = [client(ip, port, "Hello World %d" % i) for i in (1, 2, 3)]
        finally:
            server.shutdown()
            server_thread.join(SOCKET_TIMEOUT)
    assert not server_thread.is_alive()
    return server_thread.name, replies


# Documented as "Received: Thread-2: Hello World 1"; since Python 3.10 a thread's default
# name also carries its target's name: "Thread-2 (process_request_thread)".
THREADED_REPLY = r"Received: (Thread-\d+(?: \(process_request_thread\))?): Hello World %d"


def test_threaded_tcp_server_example():
    loop_thread, replies = run_example(ThreadedTCPServer, ThreadedTCPRequestHandler)
    names = []
    for i, line in enumerate(replies, start=1):
        match = re.fullmatch(THREADED_REPLY % i, line)
        assert match, line
        names.append(match.group(1))
    assert len(set(names)) == 3 and loop_thread not in names


def test_forking_tcp_server_example():
    _, replies = run_example(ForkingTCPServer, ForkingTCPRequestHandler)
    pids = []
    for i, line in enumerate(replies, start=1):
        match = re.fullmatch(r"Received: (\d+): Hello World %d" % i, line)
        assert match, line
        pids.append(int(match.group(1)))
    assert os.getpid() not in pids
    assert len(set(pids)) == 3  # one child per request
