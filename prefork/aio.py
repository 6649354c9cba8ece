"""The app's side of asyncio mode: async handler classes and what counts as a handler. Runs in: worker.

A service for ``mode = "asyncio"`` offers, the way a synchronous one offers ``StreamHandler``
and ``DatagramHandler``:

- ``AsyncStreamHandler`` for stream listeners (TCP, Unix): either a coroutine function
  ``async def handle(reader, writer)`` (asyncio's StreamReader and StreamWriter), or a subclass
  of ``AsyncStreamRequestHandler`` whose async ``handle()`` uses ``self.reader``,
  ``self.writer``, ``self.client_address`` and ``self.server``, or an ``asyncio.Protocol``
  subclass, one instance per connection, its callbacks called in the loop (no task and no
  stream objects per connection: the fastest, for a service that parses bytes itself);
- ``AsyncDatagramHandler`` for datagram listeners (UDP, Unix datagram): either a coroutine
  function ``async def handle(data, address, transport)``, run as a task per datagram, or an
  ``asyncio.DatagramProtocol`` subclass, one instance per listener, whose
  ``datagram_received`` is called in the loop (no task per datagram: the fastest).

A handler given directly (``prefork run mymodule:handle --mode asyncio``) serves the listeners
of its kind. The connection is closed when the handler returns or raises; the exception is
logged with its traceback and the worker goes on.

This module knows nothing of the master: like ``prefork.handlers`` it is what apps import.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from typing import Any

from prefork.handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler

__all__ = ["AsyncStreamRequestHandler", "Endpoint", "STREAM", "DATAGRAM", "async_kind", "describe"]

STREAM, DATAGRAM = "stream", "datagram"


class Endpoint:
    """What a handler sees as ``self.server``: the listener it was accepted on."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name  # the listener's bind spec, e.g. "tcp://127.0.0.1:9000"
        self.socket = sock
        self.server_address = sock.getsockname()

    def __repr__(self) -> str:
        return f"<Endpoint {self.name}>"


class AsyncStreamRequestHandler:
    """Base class of asyncio stream handlers, mirroring StreamRequestHandler.

    One instance per connection. The worker awaits ``setup()``, ``handle()`` and, even when
    ``handle()`` raises, ``finish()``; then it closes the connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_address: Any,
                 server: Endpoint) -> None:
        self.reader = reader
        self.writer = writer
        self.client_address = client_address
        self.server = server

    async def run(self) -> None:
        """Called by the worker: setup, handle, finish."""
        await self.setup()
        try:
            await self.handle()
        finally:
            await self.finish()

    async def setup(self) -> None:
        pass

    async def handle(self) -> None:
        pass

    async def finish(self) -> None:
        pass


def async_kind(handler: Any) -> str | None:
    """STREAM or DATAGRAM for an asyncio handler; None for anything else."""
    if isinstance(handler, type):
        if issubclass(handler, (AsyncStreamRequestHandler, asyncio.Protocol)):
            return STREAM
        if issubclass(handler, asyncio.DatagramProtocol):
            return DATAGRAM
        return None
    if inspect.iscoroutinefunction(handler):
        return {2: STREAM, 3: DATAGRAM}.get(_positional_count(handler))
    return None


def describe(handler: Any) -> str:
    """What kind of handler *handler* is, in words, for an error message."""
    kind = async_kind(handler)
    if kind is not None:
        return f"an asyncio {kind} handler"
    if isinstance(handler, type) and issubclass(handler, BaseRequestHandler):
        base = next((b.__name__ for b in (StreamRequestHandler, DatagramRequestHandler) if issubclass(handler, b)),
                    BaseRequestHandler.__name__)
        return f"a synchronous handler (a {base})"
    if inspect.iscoroutinefunction(handler):
        return (f"a coroutine function of {_positional_count(handler)} arguments (an asyncio handler takes "
                "(reader, writer) or (data, address, transport))")
    return f"not an asyncio handler ({type(handler).__name__})"


def _positional_count(function: Any) -> int:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return -1  # no signature to read: not a handler we can call
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in kinds)
