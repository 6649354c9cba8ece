"""Who the client is behind a trusted proxy: X-Forwarded-For/-Proto/-Host and RFC 7239 Forwarded. Runs in: worker.

Rules:

1. Only a peer listed in the ``forwarded_allow_ips`` setting (addresses or networks; ``*`` for
   any; by default the loopback addresses) is believed; from any other peer the headers are left
   as they are, for the app to see, and change nothing. A Unix-socket peer is local, so trusted.
2. ``Forwarded`` (RFC 7239) wins over the X-Forwarded-* headers when both are sent. Of a list of
   hops the last one is the client as the trusted proxy saw it (the one next to it).
3. What it gives: the client's address (``REMOTE_ADDR``), the scheme the client used
   (``wsgi.url_scheme``: only ``http`` or ``https`` are taken) and the host it asked for.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Forwarded", "forwarded"]

_SCHEMES = ("http", "https")


@dataclasses.dataclass(frozen=True)
class Forwarded:
    """What a trusted proxy said of the client; None where it said nothing usable."""

    client: str | None = None
    scheme: str | None = None
    host: str | None = None


def forwarded(headers: list[tuple[str, str]]) -> Forwarded:
    """The client as a trusted proxy's headers describe it (call only for a trusted peer)."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
            values.setdefault(lower, []).append(value)
    if "forwarded" in values:
        return _rfc7239(",".join(values["forwarded"]))
    client = _last(values.get("x-forwarded-for"))
    scheme = _last(values.get("x-forwarded-proto"))
    host = _last(values.get("x-forwarded-host"))
    return Forwarded(_node(client) if client else None, _scheme(scheme), host or None)


def _last(values: list[str] | None) -> str | None:
    if not values:
        return None
    return ",".join(values).split(",")[-1].strip() or None


def _scheme(value: str | None) -> str | None:
    value = (value or "").strip().lower()
    return value if value in _SCHEMES else None


def _rfc7239(text: str) -> Forwarded:
    """The last element of a Forwarded header: for=, proto=, host= (quoted strings unquoted)."""
    element = text.split(",")[-1]
    pairs: dict[str, str] = {}
    for pair in element.split(";"):
        key, eq, value = pair.strip().partition("=")
        if eq:
            pairs[key.strip().lower()] = _unquote(value.strip())
    client = pairs.get("for")
    return Forwarded(_node(client) if client else None, _scheme(pairs.get("proto")), pairs.get("host") or None)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def _node(value: str) -> str | None:
    """The address of a node: ``192.0.2.1``, ``192.0.2.1:80``, ``[2001:db8::1]:80``; None for
    ``unknown`` or an obfuscated name (``_hidden``)."""
    value = value.strip()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else None
    if value.count(":") == 1:
        value = value.split(":")[0]
    if not value or value.lower() == "unknown" or value.startswith("_"):
        return None
    return value
