"""Per-request bookkeeping in a worker: scoreboard, access log, read timeout. Runs in: worker.

Everything here wraps a server's own hooks on the instance, so the app's server class runs as
written and the hooks keep their order:

- ``process_request`` is framed by the scoreboard (busy/idle, client, listener, counts) and gives
  stream connections the ``read_timeout`` before the handler reads; ``handle_error`` then logs a
  connection dropped for it in one line, without a traceback;
- ``finish_request`` is timed into the slot's latency histogram for the listener, in the thread
  or child that serves the request (so thread and fork modes measure the handler, not the
  hand-off); the time a connection waited in the listen queue is not in it;
- with an access log, ``finish_request`` is timed and logged (in the thread or child that serves
  the request), and ``verify_request`` logs refusals.

Byte counts: TCP from the kernel's TCP_INFO (one getsockopt per request, only with an access
log), datagrams from the packet and the replies sent; Unix streams are not counted ("-"). This
module is the one reader of TCP_INFO: also ``accept_queue_length``, for a stopping worker and
the master's queue-depth gauge, and its Unix twin ``unix_accept_queue_length`` (sock_diag).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import sys
import time
from typing import Any

from prefork.scoreboard import SlotWriter

__all__ = ["instrument", "client_text", "stricter_timeout", "accept_queue_length", "unix_accept_queue_length",
           "tls_text"]

log = logging.getLogger("prefork.worker")

# struct tcp_info (linux/tcp.h), the one place prefork reads it: eight u8 fields, then u32 rto,
# ato, snd_mss, rcv_mss and unacked, which on a listening socket is the length of its accept
# queue (sacked: the backlog). Further on, the counters read per request: bytes_received (u64),
# notsent_bytes (u32, since Linux 4.6), bytes_sent and bytes_retrans (u64, since 4.19).
_TCPI_UNACKED = 24
_TCP_INFO_LISTEN_BYTES = 32
_TCP_INFO_SIZE = 232
_BYTES_RECEIVED = 128
_NOTSENT_BYTES = 144
_BYTES_SENT = 200
_BYTES_RETRANS = 208
# Connection states (tcpi_state) in which the peer's FIN has been received: TIME_WAIT, CLOSE,
# CLOSE_WAIT, LAST_ACK, CLOSING.
_PEER_FIN_STATES = frozenset({6, 7, 8, 9, 11})


def instrument(server: Any, slot: SlotWriter, listener: str, index: int, access: Any = None,
               read_timeout: float = 0.0) -> None:
    """Wrap *server*'s hooks for the scoreboard and, if given, the access log."""
    _report_to_scoreboard(server, slot, listener.encode(), index, read_timeout)
    if read_timeout:
        _quiet_read_timeouts(server, read_timeout)
    if access is None:
        _time_requests(server, slot, index)
    else:  # one clock pair per request for both the access log and the latency histogram
        _log_requests(server, access, listener, slot, index)


def client_text(address: Any) -> str:
    """'127.0.0.1:5555', '[::1]:5555', or the Unix peer's path (often empty: 'unix')."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address or "unix")


def tls_text(request: Any) -> str | None:
    """'TLSv1.3/TLS_AES_256_GCM_SHA384' for a TLS connection (the access log's tls field): its
    ssl.SSLSocket, or the ssl.SSLObject of an asyncio transport; else None."""
    if not isinstance(request, (ssl.SSLSocket, ssl.SSLObject)):
        return None
    cipher = request.cipher()
    return f"{request.version()}/{cipher[0]}" if cipher else None


def stricter_timeout(connection: socket.socket, own: float | None) -> float | None:
    """*own* (a handler's own limit), or the connection's timeout if that is shorter.

    The ``read_timeout`` setting is set on a connection before its handler runs; a handler
    that sets a timeout of its own (the bundled services do) keeps the stricter of the two.
    """
    given = connection.gettimeout()
    if not given:
        return own
    return given if own is None else min(given, own)


def _report_to_scoreboard(server: Any, slot: SlotWriter, listener: bytes, index: int,
                          read_timeout: float) -> None:
    process_request = server.process_request

    def process_request_reported(request: Any, client_address: Any) -> None:
        if read_timeout and isinstance(request, socket.socket) and request.gettimeout() is None:
            request.settimeout(read_timeout)  # a silent client cannot hold the worker for ever
        slot.begin(client_text(client_address).encode(), listener)
        try:
            process_request(request, client_address)
        finally:
            slot.end(index)

    server.process_request = process_request_reported


def _time_requests(server: Any, slot: SlotWriter, index: int) -> None:
    finish_request = server.finish_request
    monotonic = time.monotonic

    def finish_request_timed(request: Any, client_address: Any) -> None:
        started = monotonic()
        try:
            finish_request(request, client_address)
        finally:
            slot.observe(index, monotonic() - started)

    server.finish_request = finish_request_timed


def _quiet_read_timeouts(server: Any, read_timeout: float) -> None:
    """A connection dropped for ``read_timeout`` is routine: one log line, not a traceback.

    Only the timeout prefork set: a handler that set its own (a different value) and hit it
    goes to the server's handle_error as before.
    """
    handle_error = server.handle_error

    def handle_error_quiet(request: Any, client_address: Any) -> None:
        if (isinstance(sys.exc_info()[1], TimeoutError) and isinstance(request, socket.socket)
                and request.gettimeout() == read_timeout):
            log.info("%s: silent for %gs (read_timeout): connection closed",
                     client_text(client_address), read_timeout)
            return
        handle_error(request, client_address)

    server.handle_error = handle_error_quiet


def _log_requests(server: Any, access: Any, listener: str, slot: SlotWriter, index: int) -> None:
    """The access log's record of each request, its duration also counted in the slot's histogram."""
    finish_request, verify_request = server.finish_request, server.verify_request
    worker_pid = os.getpid()

    def finish_request_logged(request: Any, client_address: Any) -> None:
        started, outcome = time.monotonic(), "error"
        tls = tls_text(request)
        counted = _CountingSocket.wrap(request)
        try:
            finish_request(counted, client_address)
            outcome = "ok"
        finally:
            duration = time.monotonic() - started
            slot.observe(index, duration)
            bytes_in, bytes_out = _byte_counts(request, counted)
            access.record(client_text(client_address), listener, os.getpid(), duration,
                          bytes_in, bytes_out, outcome, tls)
            if os.getpid() != worker_pid:
                access.flush()  # a forked per-request child leaves by os._exit: write it now

    def verify_request_logged(request: Any, client_address: Any) -> bool:
        allowed = bool(verify_request(request, client_address))
        if not allowed:
            access.record(client_text(client_address), listener, os.getpid(), 0.0, None, None, "refused")
        return allowed

    server.finish_request = finish_request_logged
    server.verify_request = verify_request_logged


def _byte_counts(request: Any, counted: Any) -> tuple[int | None, int | None]:
    if isinstance(counted, tuple) and isinstance(counted[1], _CountingSocket):
        return len(counted[0]), counted[1].sent
    if isinstance(request, socket.socket) and request.family in (socket.AF_INET, socket.AF_INET6):
        return _tcp_byte_counts(request)
    return None, None


def _tcp_byte_counts(conn: socket.socket) -> tuple[int | None, int | None]:
    try:
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, AttributeError):
        return None, None  # closed by the handler, or no TCP_INFO here
    if len(info) < _BYTES_RETRANS + 8:
        return None, None  # a kernel older than 4.19
    received, = struct.unpack_from("Q", info, _BYTES_RECEIVED)
    if info[0] in _PEER_FIN_STATES:
        received = max(0, received - 1)  # the client's FIN takes a sequence number, not a byte
    notsent, = struct.unpack_from("I", info, _NOTSENT_BYTES)
    sent, retrans = struct.unpack_from("QQ", info, _BYTES_SENT)
    return received, sent - retrans + notsent


def accept_queue_length(sock: socket.socket) -> int | None:
    """How many connections wait in the TCP listener *sock*'s accept queue; None where unknown.

    Linux reports it as tcpi_unacked of TCP_INFO on a listening socket.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LISTEN_BYTES)
    except (OSError, AttributeError):
        return None
    if len(info) != _TCP_INFO_LISTEN_BYTES:
        return None
    return int(struct.unpack_from("=I", info, _TCPI_UNACKED)[0])


# sock_diag (linux/sock_diag.h, linux/unix_diag.h): the one way the kernel tells how many
# connections wait on a Unix listener (what `ss -lx` shows as Recv-Q). A request names the socket
# by inode (any cookie: ~0) and asks for UDIAG_SHOW_RQLEN; the answer's UNIX_DIAG_RQLEN attribute
# holds (rqueue, wqueue), on a listener the queue's length and its backlog.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_TCP_LISTEN = 10
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_RQLEN = 4
_NO_COOKIE = 0xFFFFFFFF
_NLMSG_HEADER = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")
_UNIX_DIAG_MSG_BYTES = 16
# The master asks on its loop: a kernel that does not answer at once is taken as "unknown".
_DIAG_TIMEOUT = 0.1


def unix_accept_queue_length(sock: socket.socket) -> int | None:
    """How many connections wait on the Unix stream listener *sock*; None where unknown."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
    except OSError:
        return None  # closed: the master is stopping, or the listener was removed
    request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, inode, _UDIAG_SHOW_RQLEN,
                                  _NO_COOKIE, _NO_COOKIE)
    header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(_DIAG_TIMEOUT)
            diag.sendto(header + request, (0, 0))
            answer = diag.recv(8192)
    except (OSError, AttributeError):
        return None  # no sock_diag here (not Linux, a sandbox without it)
    return _rqueue(answer)


def _rqueue(answer: bytes) -> int | None:
    """The rqueue of a sock_diag answer's UNIX_DIAG_RQLEN attribute; None for an error or none."""
    if len(answer) < _NLMSG_HEADER.size:
        return None
    length, kind = _NLMSG_HEADER.unpack_from(answer)[:2]
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: the socket is gone, or the kernel refuses
    offset = _NLMSG_HEADER.size + _UNIX_DIAG_MSG_BYTES
    while offset + 4 <= min(length, len(answer)):
        size, attribute = struct.unpack_from("=HH", answer, offset)
        if attribute == _UNIX_DIAG_RQLEN and size >= 12:
            return int(struct.unpack_from("=I", answer, offset + 4)[0])
        offset += max(4, (size + 3) & ~3)
    return None


class _CountingSocket:
    """The reply socket of a datagram request, counting what the handler sends through it."""

    __slots__ = ("_sock", "sent")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sent = 0

    @classmethod
    def wrap(cls, request: Any) -> Any:
        if isinstance(request, tuple) and len(request) == 2 and isinstance(request[1], socket.socket):
            return request[0], cls(request[1])
        return request

    def sendto(self, data: Any, *args: Any) -> int:
        sent: int = self._sock.sendto(data, *args)
        self.sent += sent
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
