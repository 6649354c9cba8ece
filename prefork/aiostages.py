"""asyncio mode's stages of a stream connection: the PROXY header, then the TLS handshake. Runs in: worker.

What the synchronous worker does in its parking lot (prefork.parking rule 6), done by the event
loop for a ``?proxy`` or ``?tls`` listener of ``mode = "asyncio"`` (prefork.aioworker).

Rules:

1. Such a listener's connections are accepted by the worker itself (``Acceptor``: the listener
   in the loop's reader, batches of non-blocking accepts), not by ``create_server(ssl=)``:
   with that, asyncio's loop and uvloop both drop a failed handshake without a word (measured
   with asyncio 3.11 and uvloop 0.23: no exception handler call, no log line unless the loop
   runs in debug mode, and the protocol never hears of it), so a worker could neither count
   nor report it.
2. Each connection passes its stages in a task of its own, all within ``handshake_timeout`` of
   its accept (0: no limit), and only then is its protocol made: stalled clients cost a task
   and a descriptor, never the loop.
3. PROXY: only from ``proxy_allow_ips`` (prefork.proxy rule 1); the header is parsed by
   ``prefork.proxy.parse``. The loop's readiness is level-triggered, so a piece of a header is
   consumed, never peeked at twice: bytes are peeked, and taken only as far as they are the
   header's (all of an incomplete header; exactly the length of a complete one), so whatever
   follows (the TLS ClientHello, the client's request) stays in the socket for the next stage.
4. TLS: ``loop.connect_accepted_socket(ssl=context, ssl_handshake_timeout=...)``, server side,
   with the context the master built (prefork.tls rule 1): the handshake's exception reaches
   the worker here. The protocol sees the client the PROXY header named.
5. A stage that fails closes the connection with one log line per stage and kind of failure per
   ``prefork.parking.REPORT_INTERVAL`` and worker, in the synchronous mode's words: one
   ``prefork.parking.Report`` of the worker's serves all its listeners and the exception handler
   of rule 6, as one parking lot's does in that mode. Never a traceback; a client that resets is
   forgotten silently.
6. The loop's exception handler (``quiet_tls_errors``) turns the SSL errors that asyncio or
   uvloop hand it into such a line; every other context goes to the handler that was there
   (the loop's default logs it with its traceback). In debug mode the loops also log SSL
   errors on the ``asyncio`` logger with a traceback: a filter drops those records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from typing import Any, Callable, Sequence

from prefork.bindspec import Network
from prefork.listeners import Listener
from prefork.parking import ACCEPT_BATCH, Report, StageFailed
from prefork.proxy import ProxyError, ProxyStage, client_address, parse
from prefork.servers import RESOURCE_ERRNOS
from prefork.tls import HandshakeStage, handshake_failure

__all__ = ["Acceptor", "Stages", "quiet_tls_errors"]

log = logging.getLogger("prefork.parking")

# A listener whose accept() fails (out of descriptors or memory) leaves the loop's reader for
# this many seconds, as asyncio's own server does.
ACCEPT_RETRY = 1.0
# handshake_timeout = 0 means no limit; the loops read None as their default (60 s), so this.
NO_LIMIT = 365 * 24 * 3600.0
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
# The context messages under which asyncio and uvloop report the errors of an SSL transport.
_TLS_MESSAGES = ("SSL", "ssl")
_TLS_CONNECTION = "TLS connection"


@dataclasses.dataclass
class _Accepted:
    """What prefork.proxy.ProxyStage.begin sees of a connection (prefork.parking.Connection)."""

    sock: socket.socket
    address: Any
    hung_up: bool = False


class Stages:
    """The stages of one listener's connections (rules 2 to 5)."""

    def __init__(self, proxy: ProxyStage | None, context: ssl.SSLContext | None, timeout: float,
                 report: Report) -> None:
        self.proxy = proxy
        self.context = context
        self.timeout = timeout or NO_LIMIT
        self.report = report  # the worker's (rule 5)

    @classmethod
    def of(cls, listener: Listener, context: ssl.SSLContext | None, proxy_allow: Sequence[Network],
           timeout: float, report: Report) -> Stages | None:
        """The stages *listener*'s spec asks for; None for a listener without ?proxy or ?tls."""
        spec = listener.spec
        if not spec.proxy and not spec.tls:
            return None
        assert context is not None or not spec.tls, "the master builds the context for every ?tls listener"
        return cls(ProxyStage(spec.proxy, proxy_allow) if spec.proxy else None, context if spec.tls else None, timeout,
                   report)

    async def connect(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, peer: Any,
                      factory: Callable[[Any], asyncio.BaseProtocol]) -> bool:
        """Take *sock* through the stages, then make its protocol with *factory*(the client's
        address); False if a stage refused it (closed, and reported)."""
        client, stage = peer, self.proxy.name if self.proxy else HandshakeStage.name
        started = loop.time()
        try:
            if self.proxy is not None:
                async with asyncio.timeout(self.timeout):
                    client = await self._proxy_header(loop, sock, peer)
            stage = HandshakeStage.name
            left = max(self.timeout - (loop.time() - started), 0.001)
            await loop.connect_accepted_socket(lambda: factory(client), sock, ssl=self.context,
                                               ssl_handshake_timeout=left if self.context else None)
            return True
        except (TimeoutError, ConnectionAbortedError):
            # TimeoutError: the PROXY header's deadline; ConnectionAbortedError: the loops'
            # ssl_handshake_timeout (an accepted socket's reads say ECONNRESET, not this).
            self.report.stalled(stage, self.timeout)
        except StageFailed as exc:
            self._failed(stage, exc, client)
        except OSError as exc:
            self._failed(stage, handshake_failure(exc), client)
        except asyncio.CancelledError:
            sock.close()  # a stopping worker's patience ran out (prefork.aioworker)
            raise
        sock.close()  # again, if its transport has closed it: closing is idempotent (uvloop defers it)
        return False

    def _failed(self, stage: str, exc: StageFailed, client: Any) -> None:
        if not exc.quiet:
            self.report.failed(stage, exc, client)

    async def _proxy_header(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, peer: Any) -> Any:
        """Rule 3: the client the header names (the peer itself where it names none)."""
        stage = self.proxy
        assert stage is not None
        stage.begin(_Accepted(sock, peer))  # a peer outside proxy_allow_ips: StageFailed
        taken = b""
        while True:
            try:
                data = sock.recv(stage.most - len(taken), _PEEK)
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock)
                continue
            except OSError as exc:
                raise StageFailed("reset", f"{exc.strerror or exc}", quiet=True) from None
            if not data:
                raise StageFailed("truncated", f"the peer closed after {len(taken)} bytes of a header"
                                  if taken else "the peer closed before a complete header")
            try:
                header = parse(taken + data, stage.versions)
            except ProxyError as exc:
                raise StageFailed(exc.kind, str(exc)) from None
            if header is None:
                taken += sock.recv(len(data))  # all of an incomplete header is the header's
                continue
            sock.recv(header.length - len(taken))  # exactly the rest of it: what follows is the client's
            return client_address(header, peer)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until *sock* has something to read (bytes, EOF or an error)."""
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Acceptor:
    """Rule 1: accepts a staged listener's connections in the loop and hands each to *admit*."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 admit: Callable[[socket.socket, Any], None],
                 out_of_resources: Callable[[OSError], None] | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.admit = admit
        # Told of an accept() that failed for want of descriptors or memory (the worker's
        # rate-limited report); other errors are logged here.
        self.out_of_resources = out_of_resources
        self.retry: asyncio.TimerHandle | None = None
        self.watching = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._ready)
        self.watching = True

    def stop(self) -> None:
        """Stop accepting and close the socket (the worker's copy of the listener)."""
        if self.retry is not None:
            self.retry.cancel()
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False
        self.sock.close()

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # taken by another worker, or all taken
            except ConnectionAbortedError:
                continue  # reset while queued: nobody to serve
            except OSError as exc:
                self._pause(exc)
                return
            conn.setblocking(False)
            self.admit(conn, peer)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors or memory (or an odd error): the level-triggered reader would spin on
        the connection it cannot take, so the listener leaves it for ACCEPT_RETRY seconds."""
        if self.out_of_resources is not None and exc.errno in RESOURCE_ERRNOS:
            self.out_of_resources(exc)
        else:
            log.warning("accept on %s failed: %s; accepting again in %gs", self.sock.getsockname(), exc, ACCEPT_RETRY)
        self.loop.remove_reader(self.sock.fileno())
        self.watching = False
        self.retry = self.loop.call_later(ACCEPT_RETRY, self.start)


def quiet_tls_errors(loop: asyncio.AbstractEventLoop, report: Report) -> None:
    """Rule 6: install the worker's exception handler on *loop* (once), reporting to *report*
    (the worker's: rule 5), and the asyncio logger's filter."""
    if isinstance(loop.get_exception_handler(), _QuietTLS):
        return
    loop.set_exception_handler(_QuietTLS(loop.get_exception_handler(), report))
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropTLSTracebacks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropTLSTracebacks())


class _QuietTLS:
    """The loop's exception handler: an SSL transport's error is one rate-limited line, the rest go on."""

    def __init__(self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
                 report: Report) -> None:
        self.previous = previous
        self.report = report

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and _about_tls(exc, str(context.get("message", ""))):
            transport = context.get("transport")
            peer = _peer_of(transport)
            failure = handshake_failure(exc)
            if not failure.quiet:
                self.report.failed(_TLS_CONNECTION, failure, peer)
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


def _about_tls(exc: OSError, message: str) -> bool:
    return isinstance(exc, ssl.SSLError) or any(word in message for word in _TLS_MESSAGES)


def _peer_of(transport: Any) -> Any:
    try:
        return transport.get_extra_info("peername") if transport is not None else None
    except Exception:  # a transport being torn down: the line names no client then
        return None


class _DropTLSTracebacks(logging.Filter):
    """Rule 6: the loops' debug-mode records of an SSL error, with its traceback, are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and _about_tls(exc, record.getMessage()))
