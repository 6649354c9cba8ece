"""Bind specs: parsing, canonical text, and what a failure on an address means. Runs in: both.

A spec has one canonical text (``BindSpec.text``) and ``parse_bind(spec.text) == spec``. The
master's listeners (prefork.listeners), the configuration and the CLI all parse specs here.

A tcp, udp, fd or systemd spec may end in an allow-list of client networks,
``tcp://0.0.0.0:8000?allow=10.0.0.0/8,127.0.0.1/32``, which workers enforce
(prefork.allowlist). In its canonical text the networks are in CIDR form, sorted (IPv4 first),
each once. Unix specs refuse ``?allow=``: a Unix peer has no network address (file
permissions, ``unix_mode``/``unix_owner``/``unix_group``, restrict who connects), and a path
cannot contain ``?allow=`` for that reason; any other ``?`` in a path is part of the path.

Any stream spec may say ``?first=server``: its protocol has the server speak first (SMTP, FTP,
a banner), so a worker hands each connection to the handler at once instead of waiting for the
client's first message (prefork.parking). ``first=client``, the default, is left out of the
canonical text.

Any stream spec may also say ``?proxy`` (a PROXY protocol header, v1 or v2, comes first on every
connection; ``?proxy=v1`` or ``?proxy=v2`` accepts only that version: prefork.proxy) and
``?tls`` (the connection is TLS: prefork.tls). Options are joined by '&' and canonically come
in the order first, proxy, tls, allow: ``tcp://0.0.0.0:443?proxy=v2&tls&allow=10.0.0.0/8``.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

from prefork.errors import BindSpecError, ConfigError

__all__ = ["BindSpec", "Network", "parse_bind", "split_bind_list", "failure_reason", "host_text", "unix_text",
           "parse_networks", "DIGITS", "MAX_FD", "INET_SCHEMES", "UNIX_SCHEMES"]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_FORMS = ("tcp://HOST:PORT, udp://HOST:PORT, HOST:PORT (tcp), unix:PATH, unix-dgram:PATH, fd://N, "
          "systemd, systemd:NAME; IPv6 addresses go in brackets, as in tcp://[::1]:8000; all but "
          "the unix forms may end in ?allow=NETWORK[,NETWORK...], as in "
          "tcp://0.0.0.0:8000?allow=10.0.0.0/8,127.0.0.1/32; a stream listener whose protocol has "
          "the server speak first takes ?first=server; a stream listener takes ?proxy (PROXY protocol "
          "v1 or v2; ?proxy=v1, ?proxy=v2 for one version) and ?tls; options are joined by &, "
          "allow= last")
INET_SCHEMES = ("tcp", "udp")
UNIX_SCHEMES = ("unix", "unix-dgram")
_STREAM_SCHEMES = ("tcp", "unix")

# Host names as getaddrinfo takes them (letters, digits, '-', '.', '_'); IPv6 goes in brackets.
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]{1,253}")
DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would also accept '٣'
_MAX_PORT = 65535
# File descriptors are C ints; a longer number would overflow before the kernel could refuse it.
MAX_FD = 2**31 - 1
# Linux's sun_path holds 108 bytes including the terminating NUL; a longer path cannot be bound.
_UNIX_PATH_MAX = 107
# LISTEN_FDNAMES entries: printable ASCII except ':' (the separator), at most 255 characters,
# as systemd's fdname_is_valid() checks.
_FDNAME = re.compile(r"[\x20-\x39\x3b-\x7e]{1,255}")

# What starts a spec's allow-list of client networks.
_ALLOW = "?allow="
# Where a spec's options start: '?' and the first option's name (every other '?' belongs to the
# address: a Unix path, a systemd name); options are joined by '&'.
_OPTIONS = re.compile(r"\?(?=(?:allow=|first=|proxy(?:=|&|$)|tls(?:&|$)))")
_FIRST_VALUES = ("client", "server")
# ?proxy: the PROXY protocol versions a listener accepts, by the option's value.
_PROXY_VALUES = {"": (1, 2), "v1": (1,), "v2": (2,)}
_OPTION_NAMES = "first=server, proxy[=v1|v2], tls and allow=NETWORK[,NETWORK...]"
# The characters of a network in CIDR form (ASCII: ipaddress would refuse the rest anyway, with
# a less helpful message), and the longest one: a full IPv6 address and a 3-digit prefix.
_NETWORK = re.compile(r"[0-9A-Fa-f.:/]{1,43}")

# Below this port, binding needs privileges (the default of net.ipv4.ip_unprivileged_port_start).
_PRIVILEGED_PORTS = 1024

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "cannot assign requested address (no local interface has this address)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EAFNOSUPPORT: "address family not supported (is IPv6 disabled?)",
    errno.ENOTSOCK: "not a socket",
    errno.EBADF: "no such open file descriptor",
}


# -- specs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BindSpec:
    """A parsed bind spec. Build with ``parse_bind``; ``text`` is its canonical form.

    ``address`` is ``(host, port)`` for tcp and udp (IPv6 without brackets), the path for
    unix and unix-dgram, the descriptor number for fd, and the name (or None) for systemd.
    """

    scheme: str
    address: Any
    text: str
    # Client networks a worker serves on this listener (``?allow=``); empty: every client.
    allow: tuple[Network, ...] = ()
    # ``?first=server``: the protocol has the server speak first, so no worker waits for the client.
    server_first: bool = False
    # ``?proxy``: the PROXY protocol versions accepted (a header must come first); empty: none.
    proxy: tuple[int, ...] = ()
    # ``?tls``: connections are TLS, the handshake done by the worker before the handler.
    tls: bool = False

    @property
    def address_text(self) -> str:
        """The canonical text without its options: what a bound socket is known by (PREFORK_FDS)."""
        return _OPTIONS.split(self.text, 1)[0]

    @property
    def is_stream(self) -> bool:
        """True for tcp and unix, False for udp and unix-dgram.

        fd and systemd sockets are whatever was passed in, so their type is known only once
        adopted: ask ``Listener.is_stream``. For them this raises ValueError.
        """
        if self.scheme in _STREAM_SCHEMES:
            return True
        if self.scheme in INET_SCHEMES + UNIX_SCHEMES:
            return False
        raise ValueError(f"{self.text}: the socket type is known only once adopted; use Listener.is_stream")

    def __str__(self) -> str:
        return self.text


def parse_bind(text: str) -> BindSpec:
    """Parse a bind spec (see ``_FORMS``); raises BindSpecError naming the spec and the problem."""
    if not isinstance(text, str) or not text:
        raise _bad(text, "empty bind spec")
    base, *query = _OPTIONS.split(text, 1)
    options = _parse_options(text, query[0]) if query else {}
    spec = _parse_address(text, base, "allow" in options)
    server_first = _parse_first(text, spec, options.get("first", "client"))
    proxy = _parse_stream_option(text, spec, "proxy", options)
    tls = _parse_stream_option(text, spec, "tls", options)
    allow = _parse_allow(text, options["allow"]) if "allow" in options else ()
    shown = (["first=server"] * server_first + ([_proxy_text(proxy)] if proxy else []) + ["tls"] * bool(tls)
             + [f"allow={','.join(map(str, allow))}"] * bool(allow))
    return dataclasses.replace(spec, allow=allow, server_first=server_first, proxy=proxy, tls=bool(tls),
                               text=spec.text + ("?" + "&".join(shown) if shown else ""))


def _parse_options(text: str, query: str) -> dict[str, str]:
    """The options after '?': NAME=VALUE joined by '&', each name once."""
    options: dict[str, str] = {}
    for item in query.split("&"):
        name, equals, value = item.partition("=")
        if name not in ("allow", "first", "proxy", "tls") or (name in ("allow", "first") and not equals):
            raise _bad(text, f"unknown option {item!r} after '?'; the options are {_OPTION_NAMES}")
        if name == "tls" and equals:
            raise _bad(text, "tls takes no value: the certificate and key are settings (certfile, keyfile)")
        if name == "proxy" and value not in _PROXY_VALUES:
            raise _bad(text, f"proxy={value!r}: the PROXY protocol version is v1 or v2 (plain ?proxy accepts both)")
        if name in options:
            raise _bad(text, f"option {name}= is given twice")
        options[name] = value
    return options


def _parse_first(text: str, spec: BindSpec, value: str) -> bool:
    if value not in _FIRST_VALUES:
        raise _bad(text, f"first={value!r}: who speaks first is 'client' (the default) or 'server'")
    if value == "server" and spec.scheme in INET_SCHEMES + UNIX_SCHEMES and not spec.is_stream:
        raise _bad(text, "first= applies to stream listeners (tcp, unix), not to datagrams")
    return value == "server"


def _parse_stream_option(text: str, spec: BindSpec, name: str, options: dict[str, str]) -> tuple[int, ...]:
    """?proxy's versions, or (1,) for ?tls; () without the option. Refused on datagram schemes."""
    if name not in options:
        return ()
    if spec.scheme in INET_SCHEMES + UNIX_SCHEMES and not spec.is_stream:
        raise _bad(text, f"{name} applies to stream listeners (tcp, unix, fd, systemd), not to datagrams")
    return _PROXY_VALUES[options[name]] if name == "proxy" else (1,)


def _proxy_text(versions: tuple[int, ...]) -> str:
    return "proxy" if len(versions) > 1 else f"proxy=v{versions[0]}"


def parse_networks(items: Sequence[str], what: str) -> tuple[Network, ...]:
    """Networks in CIDR form as ``?allow=`` takes them (sorted, each once); ConfigError naming *what*."""
    try:
        return _parse_allow(what, ",".join(items))
    except BindSpecError as exc:
        detail = str(exc).partition(": ")[2].partition("; accepted forms")[0].replace("allow= ", "")
        raise ConfigError(f"{what}: {detail}") from None


def split_bind_list(text: str) -> list[str]:
    """The specs of a comma-separated list (PREFORK_BIND), the networks of ``?allow=`` kept with theirs.

    After a spec with an allow-list, an item that is not a spec but looks like a network
    (``tcp://0.0.0.0:80?allow=10.0.0.0/8,::1,udp://0.0.0.0:53``) continues that list.
    """
    specs: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if specs and "allow=" in _OPTIONS.split(specs[-1], 1)[-1] and _continues_allow(item):
            specs[-1] += f",{item}"
        else:
            specs.append(item)
    return specs


def _continues_allow(item: str) -> bool:
    if not _NETWORK.fullmatch(item) or "//" in item:
        return False
    try:
        parse_bind(item)
    except BindSpecError:
        return True
    return False  # a bare HOST:PORT spec


def _parse_address(text: str, base: str, allow: bool) -> BindSpec:
    """The spec of *base*, the part of *text* before its options; *allow*: it has ``allow=``."""
    head, sep, rest = base.partition(":")
    scheme = head.lower()
    if scheme in UNIX_SCHEMES:
        if allow:
            raise _bad(text, "allow= does not apply to Unix sockets: their clients have no network "
                             "address (restrict them with unix_mode, unix_owner and unix_group)")
        return _parse_unix(text, scheme, rest, sep)
    if scheme == "systemd":
        return _parse_systemd(text, rest, sep)  # '?' is allowed in a socket name
    if "?" in base:
        raise _bad(text, f"unknown option {base.partition('?')[2].partition('=')[0]!r} after '?'; "
                         f"the options are {_OPTION_NAMES}")
    if sep and rest.startswith("//"):
        return _parse_url(text, scheme, head, rest[2:])
    if scheme in INET_SCHEMES + ("fd",):
        raise _bad(text, f"'{head}:' must be followed by '//'")
    return _parse_inet(text, "tcp", base)


def _parse_allow(text: str, listed: str) -> tuple[Network, ...]:
    """The networks of ``?allow=``: sorted (IPv4 first), each once, so the text is canonical."""
    if not listed:
        raise _bad(text, "allow= lists no network; give NETWORK[,NETWORK...], e.g. allow=10.0.0.0/8,127.0.0.1/32")
    networks = {_parse_network(text, item) for item in listed.split(",")}
    return tuple(sorted(networks, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


def _parse_network(text: str, item: str) -> Network:
    if not item:
        raise _bad(text, "allow= has an empty network (two commas in a row, or one at an end)")
    if not _NETWORK.fullmatch(item):
        raise _bad(text, f"allow= network {item!r} is not a network in CIDR form, such as 10.0.0.0/8, "
                         "127.0.0.1 or 2001:db8::/32")
    try:
        return ipaddress.ip_network(item)
    except ValueError as exc:
        raise _bad(text, f"allow= network {item!r} is not valid: {_network_problem(item, exc)}") from None


def _network_problem(item: str, exc: ValueError) -> str:
    try:
        loose = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return str(exc)
    return f"it has host bits set; did you mean {loose}?"


def _bad(text: object, what: str) -> BindSpecError:
    return BindSpecError(f"bind spec {text!r}: {what}; accepted forms: {_FORMS}")


def _parse_url(text: str, scheme: str, head: str, rest: str) -> BindSpec:
    if scheme in INET_SCHEMES:
        return _parse_inet(text, scheme, rest)
    if scheme == "fd":
        return _parse_fd(text, rest)
    raise _bad(text, f"unknown scheme {head!r}")


def _parse_inet(text: str, scheme: str, hostport: str) -> BindSpec:
    host, port_text = _split_host_port(text, hostport)
    if not DIGITS.fullmatch(port_text) or len(port_text) > 5 or int(port_text) > _MAX_PORT:
        raise _bad(text, f"port {port_text!r} is not a number from 0 to {_MAX_PORT}")
    port = int(port_text)
    return BindSpec(scheme, (host, port), f"{scheme}://{host_text(host)}:{port}")


def _split_host_port(text: str, hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise _bad(text, "missing ']' after the IPv6 address")
        host, after = _parse_ipv6(text, hostport[1:end]), hostport[end + 1:]
        if not after.startswith(":"):
            raise _bad(text, "missing ':PORT' after the IPv6 address")
        return host, after[1:]
    host, sep, port = hostport.rpartition(":")
    if not sep:
        raise _bad(text, "missing ':PORT'")
    if ":" in host:
        raise _bad(text, "an IPv6 address goes in brackets, as in tcp://[::1]:8000")
    if not host:
        raise _bad(text, "missing host (0.0.0.0 or [::] listen on every interface)")
    if not _HOSTNAME.fullmatch(host):
        raise _bad(text, f"{host!r} is not a host name or IP address")
    return host, port


def _parse_ipv6(text: str, host: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        raise _bad(text, f"{host!r} is not an IPv6 address") from None


def host_text(host: str) -> str:
    """A host as a spec writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _parse_fd(text: str, number: str) -> BindSpec:
    if not DIGITS.fullmatch(number) or len(number) > 10 or int(number) > MAX_FD:
        raise _bad(text, f"{number!r} is not a file descriptor number")
    fd = int(number)
    return BindSpec("fd", fd, f"fd://{fd}")


def _parse_unix(text: str, scheme: str, rest: str, sep: str) -> BindSpec:
    path = rest[2:] if rest.startswith("//") else rest
    if not sep or not path:
        raise _bad(text, f"missing the socket's path after '{scheme}:'")
    if "\0" in path:
        raise _bad(text, "a path cannot contain a NUL character")
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise _bad(text, "the path cannot be encoded for the file system") from None
    if size > _UNIX_PATH_MAX:
        raise _bad(text, f"the path is {size} bytes long; Unix sockets allow at most {_UNIX_PATH_MAX}")
    return BindSpec(scheme, path, unix_text(scheme, path))


def unix_text(scheme: str, path: str) -> str:
    """The spec text of a Unix socket *path* under *scheme* ('unix' or 'unix-dgram')."""
    # 'unix://X' means the path X, so a path that itself starts with '//' keeps its prefix.
    return f"{scheme}://{path}" if path.startswith("//") else f"{scheme}:{path}"


def _parse_systemd(text: str, name: str, sep: str) -> BindSpec:
    if not sep:
        return BindSpec("systemd", None, "systemd")
    if not _FDNAME.fullmatch(name):
        raise _bad(text, f"{name!r} is not a socket name (1 to 255 printable ASCII characters, no ':')")
    return BindSpec("systemd", name, f"systemd:{name}")


def failure_reason(exc: OSError, *, port: int | None = None, path: str | None = None) -> str:
    """The user-facing reason of a failed socket call."""
    if exc.errno == errno.EACCES and port is not None and 0 < port < _PRIVILEGED_PORTS:
        return f"permission denied (ports below {_PRIVILEGED_PORTS} need privileges)"
    if exc.errno == errno.ENOENT and path is not None:
        return f"the directory {os.path.dirname(os.path.abspath(path))} does not exist"
    if exc.errno == errno.EACCES and path is not None:
        return f"permission denied (check the permissions of {os.path.dirname(os.path.abspath(path))})"
    return _REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
