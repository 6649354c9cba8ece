"""asyncio-mode apps that integration tests run in real masters. Each line a client sends is a command.

``AsyncStreamHandler`` is a coroutine function (reader, writer); ``handlers`` offers the class
form; ``AsyncDatagramHandler`` is a coroutine function of (data, address, transport);
``protocols`` offers an asyncio.Protocol and a DatagramProtocol, echoing (no commands);
``tls_info`` says what a TLS connection's handler sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import types
from typing import Any

from prefork.aio import AsyncStreamRequestHandler
from tests.integration.apps import answer


async def answer_async(command: bytes) -> bytes:
    """As tests.integration.apps.answer, with "wait N" sleeping in the loop and "block N" blocking it."""
    verb, _, arg = command.partition(b" ")
    if verb == b"wait":
        await asyncio.sleep(float(arg))
        return b"waited"
    if verb == b"block":
        time.sleep(float(arg))  # blocks the event loop: the watchdog's case
        return b"blocked"
    if verb == b"loop":
        return type(asyncio.get_running_loop()).__module__.partition(".")[0].encode()
    if verb == b"loop-error":  # an error of the loop's own, unrelated to TLS: logged with its traceback
        asyncio.get_running_loop().call_soon(_fail_in_a_callback)
        return b"scheduled"
    if verb == b"ssl-error":  # as asyncio or uvloop report an SSL transport's error: one quiet line
        asyncio.get_running_loop().call_exception_handler({
            "message": "Fatal error on SSL transport",
            "exception": ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed")})
        return b"reported"
    if verb == b"task":
        task = asyncio.current_task()
        return task.get_name().encode() if task is not None else b"-"
    return answer(command)


def _fail_in_a_callback() -> None:
    raise RuntimeError("an unrelated loop error on purpose")


async def AsyncStreamHandler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each line until the client closes."""
    while line := await reader.readline():
        writer.write(await answer_async(line.rstrip(b"\n")) + b"\n")
        await writer.drain()


async def AsyncDatagramHandler(data: bytes, address: Any, transport: asyncio.DatagramTransport) -> None:
    transport.sendto(await answer_async(data.rstrip(b"\n")), address)


class ClassHandler(AsyncStreamRequestHandler):
    """The class form: says who it serves, then answers lines."""

    async def handle(self) -> None:
        self.writer.write(f"{os.getpid()} {self.server.name}\n".encode())
        while line := await self.reader.readline():
            self.writer.write(await answer_async(line.rstrip(b"\n")) + b"\n")
            await self.writer.drain()


# An app object, as a module would be: its stream handler is the class form.
handlers = types.SimpleNamespace(AsyncStreamHandler=ClassHandler)


class EchoProtocol(asyncio.Protocol):
    """The Protocol form: echoes what arrives; a chunk "raise" raises in data_received."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"raise"):
            raise RuntimeError("the protocol failed on purpose")
        self.transport.write(data)


class EchoDatagrams(asyncio.DatagramProtocol):
    """The DatagramProtocol form: echoes each datagram; a datagram "raise" raises."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data.startswith(b"raise"):
            raise RuntimeError("the datagram protocol failed on purpose")
        self.transport.sendto(data, addr)


protocols = types.SimpleNamespace(AsyncStreamHandler=EchoProtocol, AsyncDatagramHandler=EchoDatagrams)


# How long the loop stays free after a "block N" datagram before BlockLater blocks it: several of
# its ticks (0.25 s), so the slot reads idle when the block starts (no connection, no handler).
BLOCK_AFTER = 1.0


class BlockLater(asyncio.DatagramProtocol):
    """A datagram "block N" is answered "scheduled", then a callback blocks the loop N seconds.

    The idle-block case of the watchdog: no connection is open and no handler runs, the loop
    is stuck in a plain callback (as one an app schedules, or its CPU-bound background work).
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        verb, _, seconds = data.strip().partition(b" ")
        if verb == b"block":
            asyncio.get_running_loop().call_later(BLOCK_AFTER, time.sleep, float(seconds))
            self.transport.sendto(b"scheduled", addr)
        else:
            self.transport.sendto(data, addr)


block_later = types.SimpleNamespace(AsyncDatagramHandler=BlockLater)


class TLSInfo(AsyncStreamRequestHandler):
    """Says, as one JSON line, what the handler of a TLS connection is given, then answers lines."""

    async def handle(self) -> None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        cert = self.writer.get_extra_info("peercert") or {}
        cipher = self.writer.get_extra_info("cipher")
        seen = {"version": ssl_object.version() if ssl_object else None, "cipher": cipher[0] if cipher else None,
                "peer": [value for kind, value in cert.get("subjectAltName", ())],
                "client": list(self.client_address) if isinstance(self.client_address, tuple) else self.client_address}
        self.writer.write(json.dumps(seen).encode() + b"\n")
        while line := await self.reader.readline():
            self.writer.write(await answer_async(line.rstrip(b"\n")) + b"\n")
            await self.writer.drain()


tls_info = types.SimpleNamespace(AsyncStreamHandler=TLSInfo)
