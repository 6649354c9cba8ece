"""A bare uvloop echo server, the asyncio suite's reference: no prefork at all. Runs in: the servers under test.

Started by the harness as ``loadtests.servers`` role ``uvloop`` with ``{"processes": N}``: an
``asyncio.Protocol`` echoing what it receives on TCP, and an ``asyncio.DatagramProtocol`` echoing
each datagram on UDP, both on one 127.0.0.1 port. With N > 1 the process forks N - 1 copies
and every process binds its own SO_REUSEPORT sockets (the kernel spreads connections and
datagrams): the fastest multi-process shape there is, without supervision. The ready file gets
``{"pid", "port"}`` once every process listens.

The same two classes are a prefork service for ``--mode asyncio`` (``AsyncStreamHandler``,
``AsyncDatagramHandler``): the suite's row with the very handler code of the bare server.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


# As a prefork service (--mode asyncio): the same protocols.
AsyncStreamHandler = Echo
AsyncDatagramHandler = DatagramEcho


def bound(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(tcp: socket.socket, udp: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, sock=tcp, backlog=4096)
    await loop.create_datagram_endpoint(DatagramEcho, sock=udp)
    await server.serve_forever()


def run_uvloop(options: dict[str, Any], ready_file: str) -> int:
    tcp = bound(socket.SOCK_STREAM, 0)
    port = tcp.getsockname()[1]
    udp = bound(socket.SOCK_DGRAM, port)
    for _ in range(int(options.get("processes", 1)) - 1):
        if os.fork() == 0:  # a copy with its own sockets on the same port
            tcp, udp = bound(socket.SOCK_STREAM, port), bound(socket.SOCK_DGRAM, port)
            break
    else:
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "port": port}, f)
        os.replace(tmp, ready_file)
    uvloop.run(serve(tcp, udp))
    return 0
