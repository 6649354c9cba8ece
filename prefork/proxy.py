"""The PROXY protocol (v1 text, v2 binary): the header a balancer sends before the client's bytes. Runs in: worker.

A listener with ``?proxy`` in its bind spec expects every connection to start with a PROXY
header (HAProxy's ``send-proxy`` / ``send-proxy-v2``) naming the client the balancer accepted.
The worker reads it in the parking lot (prefork.parking), before TLS and before the allow-list.

Rules:

1. Only peers in the ``proxy_allow_ips`` networks may send a header; a connection from any other
   peer is closed before a byte is read (a client cannot claim an address by speaking the
   protocol itself). A Unix socket's peer has no address: the socket file's permissions decide
   who may connect, so every Unix peer may send one.
2. Strict: a header is complete (v1: at most ``V1_MAX`` bytes ending in CRLF; v2: 16 bytes and
   the length they announce, at most ``V2_MAX``) and well-formed, or the connection is closed.
   Bytes that cannot start a header (garbage, a client speaking its protocol directly) fail at
   once, without waiting for more.
3. Exactly the header's bytes are consumed; whatever follows is the client's and reaches the
   handler (or the TLS handshake) untouched.
4. ``client_address`` becomes the source the header names. A v2 ``LOCAL`` command (a balancer's
   health check), v1 ``UNKNOWN`` and address families without a host and port keep the
   socket's own peer.

``parse`` is pure (bytes in, a ``Header``, None for "need more", or ``ProxyError`` out);
``ProxyStage`` is the lot's stage that peeks and consumes.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from typing import Any, Sequence

from prefork.allowlist import AllowList
from prefork.bindspec import Network
from prefork.parking import Connection, StageFailed, Waiting

__all__ = ["Header", "ProxyError", "ProxyStage", "parse", "client_address", "V1_MAX", "V2_MAX", "V2_SIGNATURE"]

# The longest v1 header (the spec's worst case: "PROXY UNKNOWN" and two IPv6 addresses, CRLF).
V1_MAX = 107
V1_PREFIX = b"PROXY "
# The 12 bytes every v2 header starts with (chosen to be invalid in every common protocol).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
# A v2 header's announced length is a u16; HAProxy sends a few hundred bytes with TLVs. The most
# a worker peeks at for one header: the fixed part and the largest length a u16 can announce.
V2_MAX = _V2_FIXED + 0xFFFF
# v2 address blocks by family/protocol byte: TCP over IPv4 and IPv6 (UDP is no stream's peer).
_V2_INET = {0x11: (socket.AF_INET, 4), 0x21: (socket.AF_INET6, 16)}
# Families v2 allows whose address is no (host, port): UNSPEC and AF_UNIX (stream or datagram).
_V2_NO_INET = (0x00, 0x31, 0x32)
_V2_COMMANDS = {0x20: "local", 0x21: "proxy"}
_V1_FAMILIES = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class ProxyError(ValueError):
    """A header that is malformed, or bytes that are no header: the connection is closed.

    ``kind`` is "no header" (the bytes cannot start one) or "malformed" (a header, but wrong).
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Header:
    """A complete header: how many bytes it takes, and the client it names (None: keep the peer)."""

    length: int
    source: tuple[str, int] | None


def parse(data: bytes, versions: Sequence[int] = (1, 2)) -> Header | None:
    """The header at the start of *data*; None if more bytes are needed; ProxyError if none can be."""
    if 2 in versions and data[:12] == V2_SIGNATURE[:len(data[:12])]:
        return _parse_v2(data) if len(data) >= _V2_FIXED else None
    if 1 in versions and data[:6] == V1_PREFIX[:len(data[:6])]:
        return _parse_v1(data)
    expected = " or ".join(f"v{v}" for v in versions)
    raise ProxyError(f"the connection starts with {data[:16]!r}, not a PROXY protocol {expected} header", "no header")


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        return None
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return Header(end + 2, None)  # the rest of the line is to be ignored (the spec says so)
    if len(fields) != 6 or fields[1] not in _V1_FAMILIES:
        raise ProxyError(f"malformed PROXY v1 header {data[:end]!r}")
    family = _V1_FAMILIES[fields[1]]
    source, _ = _v1_address(family, fields[2], fields[4]), _v1_address(family, fields[3], fields[5])
    return Header(end + 2, source)


def _v1_address(family: int, host: bytes, port: bytes) -> tuple[str, int]:
    try:
        text = host.decode("ascii")
        socket.inet_pton(family, text)
    except (UnicodeDecodeError, OSError):
        raise ProxyError(f"PROXY v1 header: {host!r} is not an IPv{4 if family == socket.AF_INET else 6} "
                         "address") from None
    if not port.isdigit() or len(port) > 5 or (port.startswith(b"0") and port != b"0") or int(port) > 65535:
        raise ProxyError(f"PROXY v1 header: {port!r} is not a port")
    return text, int(port)


def _parse_v2(data: bytes) -> Header | None:
    if data[:12] != V2_SIGNATURE:
        raise ProxyError("malformed PROXY v2 signature")
    command, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if command not in _V2_COMMANDS:
        raise ProxyError(f"PROXY v2 header: version/command byte 0x{command:02x} (expected 0x20 or 0x21)")
    if len(data) < _V2_FIXED + length:
        return None
    total = _V2_FIXED + length
    if _V2_COMMANDS[command] == "local":
        return Header(total, None)  # the balancer's own connection (a health check): keep the peer
    if family in _V2_NO_INET:
        return Header(total, None)
    if family not in _V2_INET:
        raise ProxyError(f"PROXY v2 header: address family/protocol 0x{family:02x} is not TCP or Unix")
    af, size = _V2_INET[family]
    if length < 2 * size + 4:
        raise ProxyError(f"PROXY v2 header: {length} bytes cannot hold two IPv{4 if size == 4 else 6} addresses and ports")
    host = socket.inet_ntop(af, data[_V2_FIXED:_V2_FIXED + size])
    port = struct.unpack_from("!H", data, _V2_FIXED + 2 * size)[0]
    return Header(total, (host, port))


class ProxyStage:
    """The parking lot's PROXY stage for a listener: peek until the header is complete, take it."""

    name = "PROXY header"

    def __init__(self, versions: Sequence[int], allowed: Sequence[Network]) -> None:
        self.versions = tuple(versions)
        self.allowed = AllowList(allowed) if allowed else None  # None: '*', any peer
        self.most = V2_MAX if 2 in self.versions else V1_MAX

    def begin(self, conn: Connection) -> None:
        """Rule 1: a peer outside proxy_allow_ips is refused before a byte is read."""
        if self.allowed is not None and conn.sock.family != socket.AF_UNIX and not self.allowed.admits(conn.address):
            raise StageFailed("untrusted peer", "not in proxy_allow_ips, so it may not name a client")

    def step(self, conn: Connection) -> Waiting | None:
        """Advance *conn*; None once its header is consumed and its address set (rules 2 to 4)."""
        sock = conn.sock
        try:
            data = sock.recv(self.most, _PEEK)
        except (BlockingIOError, InterruptedError):
            return Waiting.READ
        except OSError as exc:
            raise StageFailed("reset", f"{exc.strerror or exc}", quiet=True) from None
        if not data:
            raise StageFailed("truncated", "the peer closed before a complete header")
        try:
            header = parse(data, self.versions)
        except ProxyError as exc:
            raise StageFailed(exc.kind, str(exc)) from None
        if header is None:
            if conn.hung_up:
                raise StageFailed("truncated", f"the peer stopped sending after {len(data)} bytes of a header")
            return Waiting.READ
        sock.recv(header.length, socket.MSG_DONTWAIT)  # the same bytes the peek saw: all buffered
        conn.address = client_address(header, conn.address)
        return None


def client_address(header: Header, peer: Any) -> Any:
    """The client *header* names (rule 4), in the shape the socket gives its peers (4 items on an
    IPv6 socket); *peer* itself where the header names none."""
    source = header.source
    if source is None:
        return peer
    if isinstance(peer, tuple) and len(peer) == 4:
        return (source[0], source[1], 0, 0)
    return source
