"""A bare uvloop echo server, the asyncio suite's reference: no prefork at all. Runs in: the servers under test.

Started by the harness as ``loadtests.servers`` role ``uvloop`` with ``{"processes": N}``: an
``asyncio.Protocol`` echoing what it receives on TCP, and an ``asyncio.DatagramProtocol`` echoing
each datagram on UDP, both on one 127.0.0.1 port. With N > 1 the process forks N - 1 copies
and every process binds its own SO_REUSEPORT sockets (the kernel spreads connections and
datagrams): the fastest multi-process shape there is, without supervision. The ready file gets
``{"pid", "port"}`` once every process listens. With ``"streams": true`` the TCP side is a
StreamReader/StreamWriter handler instead (``stream_echo``).

The same two classes are a prefork service for ``--mode asyncio`` (``AsyncStreamHandler``,
``AsyncDatagramHandler``): the suite's row with the very handler code of the bare server.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import types
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


async def stream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``{"streams": true}``: asyncio's streams instead of a Protocol, as workers.echo's handler
    uses them (a line read, written, drained), so that the streams' own cost has a bare row."""
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# As a prefork service (--mode asyncio): the same protocols; ``loadtests.uvloop_echo:streams``
# the streams handler instead.
AsyncStreamHandler = Echo
AsyncDatagramHandler = DatagramEcho
streams = types.SimpleNamespace(AsyncStreamHandler=stream_echo, AsyncDatagramHandler=DatagramEcho)


def bound(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(tcp: socket.socket, udp: socket.socket, streams: bool) -> None:
    loop = asyncio.get_running_loop()
    if streams:
        server = await asyncio.start_server(stream_echo, sock=tcp, backlog=4096)
    else:
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
    uvloop.run(serve(tcp, udp, bool(options.get("streams"))))
    return 0
