"""Client allow-lists of listeners (``?allow=`` in a bind spec), enforced per request. Runs in: worker.

Rules:

1. A listener without an allow-list costs nothing: its server is not wrapped at all.
2. With one, the server's own ``verify_request`` (the app's, if it overrides it) is wrapped on
   the instance: a client outside every network is refused before the app's check runs, and
   the app's check still runs for the clients the list admits. A refused TCP connection is
   then closed by the server without reaching the handler; a refused datagram is dropped.
3. IPv4 networks also admit IPv4-mapped IPv6 peers (``::ffff:10.1.2.3``), which a dual-stack
   socket (an inherited ``[::]`` socket without IPV6_V6ONLY) reports for IPv4 clients.
4. A peer that has no IP address (a Unix socket reached through fd:// or systemd) is refused:
   the list can only admit addresses. The master refuses such a spec before it forks.
5. Refusals are logged on ``prefork.allowlist`` at most once per ``REPORT_INTERVAL`` per
   listener and worker, with the number refused since the last line: a scan cannot flood the
   error log. The access log, if any, still has one ``refused`` line per request.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Sequence

from prefork.accounting import client_text
from prefork.bindspec import Network
from prefork.ratelimit import RateLimit

__all__ = ["AllowList", "guard"]

log = logging.getLogger("prefork.allowlist")

# A port scan refuses thousands of connections a second: one line in this long per listener
# and worker says it is happening, with a count, and keeps the error log readable.
REPORT_INTERVAL = 10.0
# ::ffff:a.b.c.d, the IPv6 form of an IPv4 address on a dual-stack socket (RFC 4291 2.5.5.2).
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


class AllowList:
    """Which peer addresses a set of networks admits; a lookup per prefix length, not per network."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self.networks = tuple(networks)
        self._v4 = _by_prefix(n for n in self.networks if n.version == 4)
        self._v6 = _by_prefix(n for n in self.networks if n.version == 6)

    def admits(self, client_address: Any) -> bool:
        """True if *client_address* (a socket's peer tuple) is in one of the networks."""
        if not isinstance(client_address, tuple) or not client_address or not isinstance(client_address[0], str):
            return False  # a Unix peer (a path, or '') has no address a network could contain
        host = client_address[0]
        try:
            if ":" not in host:
                return _within(int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big"), 32, self._v4)
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # without a zone
        except OSError:
            return False  # not an address: refuse rather than guess
        if packed.startswith(_MAPPED_PREFIX) and _within(int.from_bytes(packed[12:], "big"), 32, self._v4):
            return True
        return _within(int.from_bytes(packed, "big"), 128, self._v6)


def _by_prefix(networks: Any) -> tuple[tuple[int, frozenset[int]], ...]:
    """(prefix length, {network number >> host bits}) for each prefix length in use."""
    table: dict[int, set[int]] = {}
    for network in networks:
        host_bits = network.max_prefixlen - network.prefixlen
        table.setdefault(network.prefixlen, set()).add(int(network.network_address) >> host_bits)
    return tuple((prefix, frozenset(numbers)) for prefix, numbers in sorted(table.items()))


def _within(number: int, bits: int, table: tuple[tuple[int, frozenset[int]], ...]) -> bool:
    return any(number >> (bits - prefix) in numbers for prefix, numbers in table)


def guard(server: Any, networks: Sequence[Network], listener: str,
          clock: Callable[[], float] = time.monotonic) -> None:
    """Make *server* refuse clients outside *networks* (see the rules). Nothing if there are none.

    Called in the worker, before the scoreboard and access log wrap the same hooks.
    """
    if not networks:
        return
    allow = AllowList(networks)
    verify_request = server.verify_request
    report = _RefusalReport(listener, clock)

    def verify_request_allowed(request: Any, client_address: Any) -> bool:
        if not allow.admits(client_address):
            report.refused(client_address)
            return False
        return bool(verify_request(request, client_address))

    server.verify_request = verify_request_allowed


class _RefusalReport:
    """Logs refused clients of one listener at a bounded rate (rule 5)."""

    def __init__(self, listener: str, clock: Callable[[], float]) -> None:
        self.listener = listener
        self.limit = RateLimit(REPORT_INTERVAL, clock)

    def refused(self, client_address: Any) -> None:
        unreported = self.limit.allow()
        if unreported is None:
            return
        more = f" ({unreported} more refused since the last report)" if unreported else ""
        log.warning("refused %s on %s: not in the listener's allow list%s",
                    client_text(client_address), self.listener, more)

