"""Bind specs to bound sockets, before any fork. Runs in: master.

Parsing lives in prefork.bindspec, sockets handed over from outside (systemd, an upgrade) in
prefork.handover; this module re-exports their public names.

Rules of this module:

1. Everything is bound in the master before the first fork; workers inherit the sockets through
   fork. The one exception is ``rebind_reuse_port``, called in the child after fork.
2. A spec has one canonical text (``BindSpec.text``) and ``parse_bind(spec.text) == spec``. A
   listener's ``name`` is the *bound* address in the same syntax (port 0 resolved), without
   the spec's ``?allow=`` (the workers enforce that, prefork.allowlist).
3. ``bind_all`` binds all or none: on a failure nothing it bound stays open or on disk.
4. Every socket handed out is non-inheritable (the master forks, it does not exec workers);
   only ``inherit_env`` marks sockets inheritable, for the re-exec of an in-place upgrade.
5. A Unix socket file is removed only by the process that bound it, and only while the file at
   the path is still the one it created (same device and inode).
6. An fd is wrapped in at most one socket object: two objects on one fd means one of them
   closes the descriptor under the other.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import logging
import os
import pwd
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from prefork.bindspec import DIGITS, INET_SCHEMES, UNIX_SCHEMES, BindSpec, host_text, parse_bind, unix_text
from prefork.bindspec import failure_reason as _reason
from prefork.errors import BindSpecError, ConfigError, ListenerError
from prefork.handover import (
    FDS_ENV,
    InheritedSockets,
    env_entry,
    inherited_groups,
    inherited_listeners,
    no_systemd_reason,
    systemd_fds,
    systemd_listeners,
)
from prefork.servers import is_listening

__all__ = [
    "BindSpec",
    "InheritedSockets",
    "Listener",
    "bind",
    "bind_all",
    "default_backlog",
    "inherit_env",
    "inherited_listeners",
    "listener_for_socket",
    "parse_bind",
    "rebind_reuse_port",
    "reconfigure",
    "systemd_listeners",
]

log = logging.getLogger("prefork.listeners")

_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)



# How long the stale-socket probe waits for a listener on a Unix path to answer. A live local
# server answers at once; a full backlog makes connect() wait, which also means "in use".
_PROBE_TIMEOUT = 1.0




# -- listeners -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Listener:
    """A bound socket and the spec it was bound from."""

    spec: BindSpec
    sock: socket.socket
    # (path, st_dev, st_ino) of the Unix socket file this process created, for close().
    _file: tuple[str, int, int] | None = field(default=None, init=False, repr=False)
    _pid: int = field(default_factory=os.getpid, init=False, repr=False)
    # The address as bound; kept because a parked UDP socket's getsockname() changes (_park).
    _address: Any = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        """The bound address as a spec, e.g. ``tcp://127.0.0.1:43121`` (port 0 resolved)."""
        address = self._address if self._address is not None else _sockname(self.sock)
        return _socket_text(self.sock, address) or self.spec.text

    @property
    def is_stream(self) -> bool:
        return self.sock.type == socket.SOCK_STREAM

    @property
    def reuses_port(self) -> bool:
        """True for a tcp/udp socket bound with SO_REUSEPORT: workers rebind it (rebind_reuse_port)."""
        return self.sock.family in _INET_FAMILIES and _reuses_port(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def with_spec(self, spec: BindSpec) -> Listener:
        """The same socket under *spec* (a reload that keeps the address, perhaps with another
        allow-list). Closing either closes the socket; only this process removes its file."""
        twin = Listener(spec, self.sock)
        twin._file, twin._pid, twin._address = self._file, self._pid, self._address
        return twin

    def close(self, *, unlink: bool = True) -> None:
        """Close the socket; with *unlink*, remove the Unix socket file if it is still ours.

        Ours means: created by this process (a forked worker never removes it) and still the
        same file (a file someone put in its place is left alone). The inode is compared while
        our socket is still open and holds it, so its number cannot have been reused.
        """
        if unlink:
            self._unlink_own_file()
        self.sock.close()

    def _unlink_own_file(self) -> None:
        owned, self._file = self._file, None
        if owned is None or os.getpid() != self._pid:
            return
        path, dev, ino = owned
        with contextlib.suppress(FileNotFoundError):  # gone already: nothing to remove
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) != (dev, ino):
                log.info("left %s in place: it was replaced after this process bound it", path)
                return
            os.unlink(path)


def default_backlog() -> int:
    """The largest listen backlog the OS allows.

    Not socketserver's 5: under a burst of connections a short accept queue makes the kernel
    drop SYNs, and clients retry only after a second or more. The kernel silently caps any
    larger value at net.core.somaxconn, so that value is both the ceiling and the best choice.
    """
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def bind(spec: BindSpec, *, backlog: int | None = None, reuse_port: bool = False,
         unix_mode: int | None = None, unix_owner: str | int | None = None,
         unix_group: str | int | None = None, environ: Mapping[str, str] | None = None,
         inherited: Mapping[str, socket.socket] | None = None) -> Listener:
    """Bind (or adopt) the socket of one spec. Called before fork.

    *backlog* None or 0 means ``default_backlog()``.

    A socket in *inherited* (from ``inherited_listeners``) whose spec text matches is adopted
    instead of binding a new one. With *reuse_port*, tcp/udp sockets get SO_REUSEPORT and are
    parked: they hold the address while the workers' own sockets (``rebind_reuse_port``) take
    the traffic. Raises ListenerError (exit code 4) naming the address and the reason, or
    ConfigError for a wrong unix_owner, unix_group, unix_mode or backlog.
    """
    binder = _Binder(backlog, reuse_port, unix_mode, unix_owner, unix_group, environ, inherited)
    return binder.bind(spec, expand=False)[0]


def bind_all(specs: Sequence[str | BindSpec], *, backlog: int | None = None, reuse_port: bool = False,
             unix_mode: int | None = None, unix_owner: str | int | None = None,
             unix_group: str | int | None = None, environ: Mapping[str, str] | None = None,
             inherited: Mapping[str, socket.socket] | None = None) -> list[Listener]:
    """Bind every spec, or none: on a failure what was bound is closed and ListenerError raised.

    ``systemd`` (and ``systemd:NAME`` when several sockets share the name) yields one listener
    per passed socket. Inherited sockets that no spec adopts are closed: the configuration no
    longer has them, and left open they would queue connections that nobody accepts.
    """
    parsed = [spec if isinstance(spec, BindSpec) else parse_bind(spec) for spec in specs]
    binder = _Binder(backlog, reuse_port, unix_mode, unix_owner, unix_group, environ, inherited)
    bound: list[Listener] = []
    try:
        for spec in parsed:
            bound.extend(binder.bind(spec, expand=True))
    except BaseException:
        for listener in bound:
            listener.close(unlink=binder.created(listener))
        raise
    finally:
        binder.close_unclaimed()
    return bound


def reconfigure(listeners: Sequence[Listener], *, backlog: int | None = None, reuse_port: bool = False,
                unix_mode: int | None = None, unix_owner: str | int | None = None,
                unix_group: str | int | None = None) -> None:
    """Give listeners kept across a reload the new backlog, and their Unix socket files the new
    owner and mode (a file this process did not create is left as it is). Called in the master.

    Raises ConfigError for a wrong setting, ListenerError when the file cannot be changed.
    """
    binder = _Binder(backlog, reuse_port, unix_mode, unix_owner, unix_group, None, None)
    for listener in listeners:
        if listener._file is not None and listener.sock.family == socket.AF_UNIX:
            binder._finish_unix(listener.spec, listener.sock)
        elif listener.sock.type == socket.SOCK_STREAM and is_listening(listener.sock):
            with _failing(listener.name, doing=f"cannot listen on {listener.name} with backlog {binder.backlog}"):
                listener.sock.listen(binder.backlog)  # Linux takes a new backlog for a listening socket


def listener_for_socket(sock: socket.socket) -> Listener:
    """Wrap a socket a server class has already bound (PreforkMixIn); nothing is bound again.

    The spec is read back from the socket. A Unix socket file at its path is treated as this
    process's own, so close() removes it.
    """
    address = _sockname(sock)
    listener = Listener(_spec_of(sock, address), sock)
    listener._address = address
    if sock.family == socket.AF_UNIX and isinstance(address, str) and address:
        listener._file = _socket_file_id(address)
    return listener


def inherit_env(listeners: Sequence[Listener]) -> dict[str, str]:
    """The environment that hands *listeners* to a re-executed master (in-place upgrade).

    ``{"PREFORK_FDS": "FD:SPEC;FD:SPEC..."}`` with each listener under the spec the user gave
    and under its bound name, so that ``tcp://127.0.0.1:0`` finds its socket again. The fds
    are made inheritable here, so that exec keeps them open.
    """
    entries = []
    for listener in listeners:
        fd = listener.fileno()
        os.set_inheritable(fd, True)
        # The address without ?allow=: the new master may allow other networks on the same socket.
        for text in dict.fromkeys((listener.spec.address_text, listener.name)):
            entries.append(env_entry(fd, text))
    return {FDS_ENV: ";".join(entries)}


def _spec_of(sock: socket.socket, address: Any) -> BindSpec:
    text = _socket_text(sock, address)
    with contextlib.suppress(BindSpecError):  # an address no spec can say: name it by its fd
        return parse_bind(text or "")
    return BindSpec("fd", sock.fileno(), f"fd://{sock.fileno()}")


def rebind_reuse_port(listener: Listener, *, backlog: int | None = None) -> Listener:
    """A new SO_REUSEPORT socket on the listener's bound address. Called in the child after fork.

    The kernel then balances connections (or datagrams) across the workers' sockets. Must be
    called before the worker drops privileges: the kernel only groups sockets of the same
    effective user. A listener that does not reuse its port (Unix sockets, inherited sockets
    without SO_REUSEPORT) is returned as it is, to be shared as usual.
    """
    if not listener.reuses_port:
        return listener
    sock = _open_inet(listener.name, listener.sock.family, listener.sock.type, listener.sock.proto,
                      listener._address or listener.sock.getsockname(), reuse_port=True)
    with _failing(listener.name, sock):
        if sock.type == socket.SOCK_STREAM:
            sock.listen(_check_backlog(backlog))
    return _new_listener(listener.spec, sock)


# -- the binder ----------------------------------------------------------------------------------


class _Binder:
    """The settings shared by the specs of one bind()/bind_all() call, and the fds they claimed."""

    def __init__(self, backlog: int | None, reuse_port: bool, unix_mode: int | None,
                 unix_owner: str | int | None, unix_group: str | int | None,
                 environ: Mapping[str, str] | None, inherited: Mapping[str, socket.socket] | None) -> None:
        self.backlog = _check_backlog(backlog)
        self.reuse_port = reuse_port
        self.unix_mode = _check_mode(unix_mode)
        self.uid = _resolve_id("unix_owner", unix_owner, lambda name: pwd.getpwnam(name).pw_uid)
        self.gid = _resolve_id("unix_group", unix_group, lambda name: grp.getgrnam(name).gr_gid)
        self.environ = os.environ if environ is None else environ
        self.groups = inherited_groups(inherited or {})
        self.inherited_by_fd = {s.fileno(): s for group in self.groups.values() for s in group}
        self.inherited_by_fd.pop(-1, None)  # closed sockets
        self.claimed: set[int] = set()
        self.fresh: set[Listener] = set()  # listeners whose Unix socket file this call created

    def bind(self, spec: BindSpec, *, expand: bool) -> list[Listener]:
        adopted = self._take_inherited(spec, expand)
        if adopted:
            return adopted
        if spec.scheme in INET_SCHEMES:
            return [self._claim(self._bind_inet(spec))]
        if spec.scheme in UNIX_SCHEMES:
            return [self._claim(self._bind_unix(spec))]
        if spec.scheme == "fd":
            return [self._adopt_fd(spec, spec.address)]
        return [self._adopt_fd(spec, fd) for fd in self._systemd_fds(spec, expand)]

    def created(self, listener: Listener) -> bool:
        return listener in self.fresh

    def close_unclaimed(self) -> None:
        for fd, sock in self.inherited_by_fd.items():
            if fd not in self.claimed and sock.fileno() >= 0:
                log.info("closing inherited socket %s: no bind spec uses it any more",
                         _socket_text(sock, _sockname(sock)) or f"fd {fd}")
                sock.close()

    def _claim(self, listener: Listener) -> Listener:
        self.claimed.add(listener.fileno())
        return listener

    # -- adopting what is already bound

    def _take_inherited(self, spec: BindSpec, expand: bool) -> list[Listener]:
        # By the address alone: a new allow-list on the same address takes over the same socket.
        socks = [s for s in self.groups.get(spec.address_text, ()) if s.fileno() not in self.claimed | {-1}]
        if spec.scheme != "systemd":
            socks = socks[:1]  # one address, one socket (duplicates come from a spec given twice)
        elif len(socks) > 1 and not expand:
            raise ListenerError(spec.text, f"{len(socks)} inherited sockets match; bind_all() takes them all")
        return [self._adopt(spec, s, own_file=spec.scheme in UNIX_SCHEMES) for s in socks]

    def _adopt_fd(self, spec: BindSpec, fd: int) -> Listener:
        if fd in self.claimed:
            raise ListenerError(spec.text, f"file descriptor {fd} is already used by another bind spec")
        sock = self.inherited_by_fd.get(fd)
        if sock is None:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ListenerError(spec.text, f"file descriptor {fd}: {_reason(exc)}") from exc
        return self._adopt(spec, sock, own_file=False)

    def _adopt(self, spec: BindSpec, sock: socket.socket, *, own_file: bool) -> Listener:
        self.claimed.add(sock.fileno())
        sock.set_inheritable(False)
        if spec.allow and sock.family not in _INET_FAMILIES:
            fd = sock.fileno()
            sock.close()  # as _failing does: this process owns what it was handed
            raise ListenerError(spec.text, f"allow= needs a TCP or UDP socket, and file descriptor "
                                f"{fd} is not one (its clients have no network address)")
        with _failing(spec.text, sock):
            parked = self.reuse_port and _reuses_port(sock)
            if sock.type == socket.SOCK_STREAM and not parked and not is_listening(sock):
                sock.listen(self.backlog)
        listener = _new_listener(spec, sock)
        if own_file and isinstance(listener._address, str):
            listener._file = _socket_file_id(listener._address)
        return listener

    def _systemd_fds(self, spec: BindSpec, expand: bool) -> list[int]:
        passed = systemd_fds(self.environ)
        if not passed:
            raise ListenerError(spec.text, no_systemd_reason(self.environ))
        fds = [fd for name, fd in passed if spec.address is None or name == spec.address]
        if not fds:
            names = ", ".join(sorted({repr(name) for name, _ in passed}))
            raise ListenerError(spec.text,
                                f"systemd passed no socket named {spec.address!r} (names passed: {names})")
        if len(fds) > 1 and not expand:
            raise ListenerError(spec.text, f"systemd passed {len(fds)} sockets; bind_all() takes them all")
        return fds

    # -- binding new sockets

    def _bind_inet(self, spec: BindSpec) -> Listener:
        family, proto, sockaddr = _resolve(spec)
        kind = socket.SOCK_STREAM if spec.scheme == "tcp" else socket.SOCK_DGRAM
        sock = _open_inet(spec.text, family, kind, proto, sockaddr, reuse_port=self.reuse_port)
        listener = _new_listener(spec, sock)
        with _failing(spec.text, sock):
            if self.reuse_port:
                _park(sock)
            elif kind == socket.SOCK_STREAM:
                sock.listen(self.backlog)
        return listener

    def _bind_unix(self, spec: BindSpec) -> Listener:
        path = spec.address
        _clear_stale(spec)
        kind = socket.SOCK_STREAM if spec.scheme == "unix" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_UNIX, kind)
        with _failing(spec.text, sock, path=path):
            with _umask(self.unix_mode):
                sock.bind(path)
        listener = _new_listener(spec, sock)
        listener._file = _socket_file_id(path)
        self.fresh.add(listener)
        try:
            self._finish_unix(spec, sock)
        except BaseException:
            listener.close()
            raise
        return listener

    def _finish_unix(self, spec: BindSpec, sock: socket.socket) -> None:
        # Owner first, mode second: until both are set the file has no permission bits (see
        # _umask), so no one but root can connect to it in between.
        path = spec.address
        if self.uid != -1 or self.gid != -1:
            with _failing(spec.text, doing=f"cannot change the owner of {path}"):
                os.chown(path, self.uid, self.gid)
        if self.unix_mode is not None:
            with _failing(spec.text, doing=f"cannot set the mode of {path} to {self.unix_mode:#o}"):
                os.chmod(path, self.unix_mode)
        if sock.type == socket.SOCK_STREAM:
            with _failing(spec.text):
                sock.listen(self.backlog)


def _new_listener(spec: BindSpec, sock: socket.socket) -> Listener:
    listener = Listener(spec, sock)
    listener._address = _sockname(sock)
    return listener


@contextlib.contextmanager
def _failing(address: str, sock: socket.socket | None = None, *, port: int | None = None,
             path: str | None = None, doing: str = "") -> Iterator[None]:
    """Turn an OSError into ListenerError(address, reason), closing *sock* first."""
    try:
        yield
    except OSError as exc:
        if sock is not None:
            sock.close()
        reason = _reason(exc, port=port, path=path)
        raise ListenerError(address, f"{doing}: {reason}" if doing else reason) from exc


# -- tcp and udp ---------------------------------------------------------------------------------


def _resolve(spec: BindSpec) -> tuple[int, int, Any]:
    """The family, protocol and socket address of a tcp/udp spec: getaddrinfo's first answer."""
    host, port = spec.address
    kind = socket.SOCK_STREAM if spec.scheme == "tcp" else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, kind, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(spec.text, f"cannot resolve host {host!r}: {exc.strerror}") from exc
    except UnicodeError as exc:  # the IDNA codec refuses empty or over-long labels
        raise ListenerError(spec.text, f"cannot resolve host {host!r}: {exc}") from exc
    family, _, proto, _, sockaddr = infos[0]
    return family, proto, sockaddr


def _open_inet(address: str, family: int, kind: int, proto: int, sockaddr: Any, *,
               reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    with _failing(address, sock, port=sockaddr[1]):
        _set_inet_options(sock, reuse_port)
        sock.bind(sockaddr)
    return sock


def _set_inet_options(sock: socket.socket, reuse_port: bool) -> None:
    if sock.type == socket.SOCK_STREAM:
        # As every production server does: a restarted master can bind its port while the
        # previous run's connections sit in TIME_WAIT (up to 2 MSL, 60 s on Linux) instead of
        # failing with "address already in use". Linux still refuses a second socket on an
        # address that is listening, so two servers never share a port by accident.
        # Not for UDP: there is no TIME_WAIT to wait out, and on Linux SO_REUSEADDR on two UDP
        # sockets lets a second server bind the same port and silently take its datagrams.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        # IPv6 only, so that tcp://[::]:P and tcp://0.0.0.0:P can both be bound: with Linux's
        # default (net.ipv6.bindv6only=0) [::] would also take IPv4 and the second spec would
        # fail. Each spec means what it says; list both for dual stack.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _park(sock: socket.socket) -> None:
    """Make the master's reuse_port socket hold its address without taking any traffic.

    The kernel balances over every socket of a SO_REUSEPORT group, the master's included,
    and nobody reads the master's. A TCP socket that does not listen is not in the group's
    accept balancing, so it is simply not listened on. A UDP socket is connected to its own
    address: a connected UDP socket only receives from its peer, and nothing else sends from
    that address.
    """
    if sock.type != socket.SOCK_DGRAM:
        return
    address = sock.getsockname()
    host = address[0]
    if ipaddress.ip_address(host.partition("%")[0]).is_unspecified:
        host = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
    sock.connect((host, *address[1:]))


def _reuses_port(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except OSError:
        return False  # closed, or a platform without SO_REUSEPORT


# -- unix ----------------------------------------------------------------------------------------


def _clear_stale(spec: BindSpec) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a file of another kind."""
    path = spec.address
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenerError(spec.text, f"{path} exists and is not a socket")
    if _probe(spec):
        raise ListenerError(spec.text, f"{path} is in use by another process")
    log.info("removing stale socket file %s: nothing listens on it", path)
    with contextlib.suppress(FileNotFoundError):  # its owner removed it meanwhile: fine
        os.unlink(path)


def _probe(spec: BindSpec) -> bool:
    """Whether a live socket answers at the path: connect() is refused only when none does.

    The window between this probe and the bind that follows is tiny; a server that starts in
    it makes our bind fail with "address already in use", never steals its file.
    """
    kind = socket.SOCK_STREAM if spec.scheme == "unix" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_UNIX, kind) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(spec.address)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (TimeoutError, BlockingIOError):
            return True  # a listener with a full backlog: busy, but alive
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                return True  # a live socket of the other type (stream vs datagram)
            raise ListenerError(spec.text, _reason(exc, path=spec.address)) from exc
    return True


@contextlib.contextmanager
def _umask(mode: int | None) -> Iterator[None]:
    """With a unix_mode, create the socket file with no permission bits at all.

    bind() creates the file with 0777 minus the umask, and chmod() can only come after; with
    umask 0777 the file is never more permissive than *mode* in between. os.umask is
    process-wide, which is safe here: the master binds before it starts any thread.
    """
    if mode is None:
        yield
        return
    previous = os.umask(0o777)
    try:
        yield
    finally:
        os.umask(previous)


def _socket_file_id(path: str) -> tuple[str, int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (path, info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


# -- settings ------------------------------------------------------------------------------------


def _check_backlog(backlog: int | None) -> int:
    if backlog is None:
        return default_backlog()
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0:
        raise ConfigError(f"setting 'backlog': {backlog!r} is not allowed; use a number >= 0 "
                          "(0: the OS maximum)")
    return backlog or default_backlog()


def _check_mode(mode: int | None) -> int | None:
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ConfigError(f"setting 'unix_mode': {mode!r} is not a file mode; use 0 to 0o7777, e.g. 0o660")
    return mode


def _resolve_id(setting: str, value: str | int | None, lookup: Callable[[str], int]) -> int:
    """A user or group name (or number) as a numeric id; -1 (leave unchanged) for None."""
    if value is None:
        return -1
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        try:
            return lookup(value)
        except KeyError:
            if DIGITS.fullmatch(value):
                return int(value)
    kind = "user" if setting == "unix_owner" else "group"
    raise ConfigError(f"setting '{setting}': no {kind} {value!r} on this system; "
                      f"use an existing {kind} name or id")


# -- naming --------------------------------------------------------------------------------------


def _sockname(sock: socket.socket) -> Any:
    try:
        return sock.getsockname()
    except OSError:
        return None  # closed


def _socket_text(sock: socket.socket, address: Any) -> str | None:
    """The spec text of a socket's bound *address*, or None if it has none that a spec can say."""
    stream = sock.type == socket.SOCK_STREAM
    if sock.family in _INET_FAMILIES and isinstance(address, tuple):
        return f"{'tcp' if stream else 'udp'}://{host_text(address[0])}:{address[1]}"
    if sock.family == socket.AF_UNIX and isinstance(address, str) and address:
        return unix_text("unix" if stream else "unix-dgram", address)
    return None  # unbound, abstract namespace, or a family prefork does not serve
