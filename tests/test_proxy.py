"""PROXY protocol headers (prefork.proxy): the parser, without processes."""

from __future__ import annotations

import socket
import struct

import pytest

from prefork.proxy import V1_MAX, V2_SIGNATURE, Header, ProxyError, parse


def v2(command: int = 0x21, family: int = 0x11, addresses: bytes | None = None, tlvs: bytes = b"") -> bytes:
    if addresses is None:
        addresses = socket.inet_aton("192.0.2.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 51000, 443)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def v2_inet6(host: str = "2001:db8::7", port: int = 40000) -> bytes:
    return v2(family=0x21, addresses=socket.inet_pton(socket.AF_INET6, host) + socket.inet_pton(socket.AF_INET6, "::1")
              + struct.pack("!HH", port, 443))


@pytest.mark.parametrize("data, expected", [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET /", Header(41, ("192.0.2.7", 51000))),
    (b"PROXY TCP6 2001:db8::7 ::1 40000 443\r\n", Header(38, ("2001:db8::7", 40000))),
    (b"PROXY UNKNOWN\r\n", Header(15, None)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", Header(59, None)),
    (v2() + b"hello", Header(28, ("192.0.2.7", 51000))),
    (v2_inet6(), Header(52, ("2001:db8::7", 40000))),
    (v2(tlvs=b"\x01\x00\x02h2"), Header(33, ("192.0.2.7", 51000))),  # TLVs are skipped
    (v2(command=0x20, family=0x00, addresses=b""), Header(16, None)),  # LOCAL: a health check
    (v2(family=0x31, addresses=bytes(216)), Header(232, None)),  # AF_UNIX: keep the peer
])
def test_complete_headers_give_their_length_and_client(data: bytes, expected: Header) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize("data", [
    b"P", b"PROXY", b"PROXY TCP4 192.0.2.7 10.0.0.1 5", V2_SIGNATURE[:5], V2_SIGNATURE, v2()[:20], v2()[:-1],
])
def test_a_header_not_yet_complete_needs_more(data: bytes) -> None:
    assert parse(data) is None


@pytest.mark.parametrize("data, words", [
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol"),
    (b"\x16\x03\x01\x02\x00", "not a PROXY protocol"),  # a TLS ClientHello: no header was sent
    (b"xPROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n", "not a PROXY protocol"),  # garbage before the header
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000\r\n", "malformed"),
    (b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.300 10.0.0.1 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 0080 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 80 2\n", "without CRLF"),
    (b"PROXY " + b"x" * V1_MAX, "without CRLF"),
    (V2_SIGNATURE[:11] + b"X" + bytes(8), "not a PROXY protocol"),
    (v2(command=0x11), "version/command"),
    (v2(command=0x22), "version/command"),
    (v2(family=0x41), "not TCP or Unix"),
    (v2(family=0x21), "cannot hold two IPv6"),
])
def test_malformed_headers_and_garbage_are_refused_at_once(data: bytes, words: str) -> None:
    with pytest.raises(ProxyError, match=words):
        parse(data)


def test_a_listener_for_one_version_refuses_the_other() -> None:
    with pytest.raises(ProxyError, match="v2 header"):
        parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n", versions=(2,))
    with pytest.raises(ProxyError, match="v1 header"):
        parse(v2(), versions=(1,))
