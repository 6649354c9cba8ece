"""The Python API of the master: PreforkMixIn, the ready-made Prefork servers, and serve(). Runs in: master.

``PreforkMixIn`` turns any server class of the core into a supervised pool:

    with PreforkTCPServer(("127.0.0.1", 9000), Handler, workers=4) as server:
        server.serve_forever()

binds in the master (the class's own ``server_bind`` runs there), forks the workers, and each
worker serves the inherited socket with the same server object, through the synchronous loop
(or the ThreadingMixIn / ForkingMixIn placed after PreforkMixIn in the bases).

``serve(app, bind=[...], workers=N, ...)`` is the entry point of the CLI: one service, any
number of listeners (TCP and UDP on one port, Unix sockets, inherited fds, systemd sockets),
each worker serving all of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
import resource
import signal
import socket
import ssl
import threading
import types
from typing import Any, Callable, Protocol, Sequence, cast

from prefork import log as log_files
from prefork.aio import async_kind, describe
from prefork.aioworker import LoopOptions, event_loop_factory
from prefork.arbiter import Arbiter, Hooks, Plan
from prefork.config import Settings, format_value, held_on_reload, make_settings
from prefork.errors import AppLoadError, ConfigError
from prefork.handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from prefork.handover import FDS_ENV
from prefork.bindspec import parse_networks
from prefork.listeners import (Listener, bind_all, inherited_listeners, listener_for_socket, parse_bind,
                               rebind_reuse_port, reconfigure)
from prefork.loader import load_object
from prefork.modes import server_class_for
from prefork.runpaths import service_name
from prefork.servers import BaseServer, LoopServer, TCPServer, UDPServer
from prefork.tls import build_context, files_digest, key_password
from prefork.worker import WorkerSpec

__all__ = [
    "PreforkMixIn",
    "PreforkTCPServer",
    "PreforkUDPServer",
    "PreforkUnixStreamServer",
    "PreforkUnixDatagramServer",
    "serve",
]

log = logging.getLogger("prefork.master")

# mode = "asyncio" raises the soft limit of open files to the hard limit, or to this where the
# hard limit is unlimited (the kernel's fs.nr_open default: a setrlimit above it fails).
DESCRIPTOR_CEILING = 1 << 20

# Hook names, in the order of a service's life.
_HOOKS = ("on_starting", "when_ready", "pre_fork", "post_fork", "worker_exit", "on_exit")


class PreforkMixIn:
    """Mix-in that serves with a supervised pool of pre-forked workers.

    Keyword arguments of the constructor (and class attributes of the same names) are prefork
    settings, e.g. ``workers=4, timeout=30, max_requests=1000``; see ``prefork.config.Settings``.
    After ``serve_forever()`` returns, ``exit_code`` holds the master's exit code.
    """

    prefork_settings: dict[str, Any] = {}
    exit_code: int | None = None
    _arbiter: Arbiter | None = None
    # Provided by the socket server class this is mixed into.
    socket: Any
    server_address: Any
    adopt_socket: Callable[..., None]

    def __init__(self, server_address: Any, RequestHandlerClass: Any, *args: Any, **kwargs: Any) -> None:
        names = {name for name in Settings.__dataclass_fields__}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        self.settings = make_settings({**self.prefork_settings, **options})
        self._stopped = threading.Event()
        super().__init__(server_address, RequestHandlerClass, *args, **kwargs)  # type: ignore[call-arg]

    def server_bind(self) -> None:
        """Bind as the server class does, unless a master we replace (USR2) handed us the socket."""
        inherited = _take_inherited(self)
        if inherited is not None:
            self.adopt_socket(inherited, bind_and_activate=False)  # the constructor binds (not again) and activates
        super().server_bind()  # type: ignore[misc]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Fork the workers and supervise them until a stop signal or shutdown()."""
        listener = listener_for_socket(self.socket)
        itself = cast(LoopServer, self)  # in each worker, this very object serves the inherited socket
        service = _Service(_ItSelf(itself), self._service_name())
        self._arbiter = Arbiter(service.plan(self.settings, [listener]))
        try:
            self.exit_code = self._arbiter.run()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the workers gracefully and wait until serve_forever() has returned."""
        arbiter = self._arbiter
        if arbiter is not None and arbiter.signals is not None:
            arbiter.signals.push(signal.SIGTERM)  # as an operator would send it
        self._stopped.wait()

    def _service_name(self) -> str:
        return self.settings.name or type(self).__name__


class PreforkTCPServer(PreforkMixIn, TCPServer):
    pass


class PreforkUDPServer(PreforkMixIn, UDPServer):
    pass


if hasattr(socket, "AF_UNIX"):
    from prefork.servers import UnixDatagramServer, UnixStreamServer

    class PreforkUnixStreamServer(PreforkMixIn, UnixStreamServer):
        pass

    class PreforkUnixDatagramServer(PreforkMixIn, UnixDatagramServer):
        pass


def serve(app: Any, bind: Sequence[str] | str | None = None, *, settings: Settings | None = None,
          server_class: type[BaseServer] | None = None,
          reload_settings: Callable[[], Settings] | None = None,
          service_options: dict[str, Any] | None = None, **options: Any) -> int:
    """Run one service until it is stopped; returns the master's exit code.

    *app* is a request handler class, an object or module with ``StreamHandler`` and/or
    ``DatagramHandler`` attributes (and optionally ``server_class`` and
    ``datagram_server_class``, the server classes for its stream and datagram listeners), or a 'module:attribute' string naming one of those, loaded in each
    worker so that a reload loads new code (unless ``preload`` is set). If the loaded object
    has ``configure``, it is called with *service_options* (and ``settings=`` the settings, if it
    takes a ``settings`` parameter) and what it returns is the service.
    """
    if settings is None:
        settings = make_settings({**options, **({"bind": bind} if bind is not None else {})})
    if not settings.bind:
        raise ConfigError("setting 'bind': no listener given; for example tcp://127.0.0.1:8000")
    if settings.umask is not None:
        os.umask(settings.umask)
    starting = _hooks(settings).on_starting
    if starting is not None:
        _run_on_starting(starting, settings)
    if settings.preload and isinstance(app, str):
        app = load_object(app)
    listeners = bind_all(settings.bind, backlog=settings.backlog or None, reuse_port=settings.reuse_port,
                         unix_mode=settings.unix_mode, unix_owner=settings.unix_owner,
                         unix_group=settings.unix_group, inherited=inherited_listeners(os.environ))
    for name in (FDS_ENV, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # adopted: workers and their children must not see them
    builder = _ServerBuilder(app, server_class, service_options or {}, settings=settings)
    if not isinstance(app, str):
        builder.app = app = builder.service(app)
    service = _Service(builder, _app_name(app), reload_settings)
    return Arbiter(service.plan(settings, listeners), service.replan if reload_settings else None).run()


def _prepare_asyncio(settings: Settings) -> None:
    """Called in the master before forking a generation: uvloop is there if asked for, and the descriptor limit
    is as high as allowed (one event-loop worker holds thousands of connections; workers inherit it)."""
    if settings.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("setting 'loop': uvloop is not installed (pip install 'prefork[uvloop]')")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = DESCRIPTOR_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("mode asyncio: raised the open files limit (RLIMIT_NOFILE) from %d to %d", soft, target)


def _run_on_starting(hook: Callable[..., Any], settings: Settings) -> None:
    """on_starting prepares the service: if it fails, the service does not start (exit 3)."""
    try:
        hook(settings)
    except Exception as exc:
        log.exception("hook on_starting failed")
        raise AppLoadError(f"hook on_starting failed: {exc!r}") from exc


class _Service:
    """Makes the plan of each generation of workers from the settings in force for it."""

    def __init__(self, build: _Builder, default_name: str,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.build = build
        self.default_name = default_name
        self.reload_settings = reload_settings
        self.tls_digest = ""  # of the certificate and key files the last plan was made from

    def plan(self, settings: Settings, listeners: list[Listener], current: Plan | None = None) -> Plan:
        """Everything a generation is built from (hooks resolved, access log opened)."""
        hooks = _hooks(settings)
        builder = self.build.configured(settings)
        builder.check(listeners)  # a mismatch is reported before any fork
        name = settings.name or self.default_name
        access_log = _access_log(settings, current)
        spec = _worker_spec(settings, listeners, builder, name, hooks, access_log)
        if isinstance(builder, _ServerBuilder) and isinstance(builder.app, str):
            spec.app_target = builder.app  # the worker finds its file while still root (prefork.loader.locate)
        self.tls_digest = files_digest(settings.certfile, settings.keyfile, settings.ca_certs) if spec.tls_context else ""
        return Plan(settings, listeners, spec, hooks, enter=lambda: _enter(settings, name))

    def replan(self, current: Plan) -> Plan:
        """Called in the master on HUP: the plan of the whole new configuration.

        Raises PreforkError to refuse it (the configuration is wrong, a listener cannot be
        bound, a hook cannot be loaded); nothing this call bound is left open then.
        """
        assert self.reload_settings is not None
        old = _settings_of(current)
        fresh, held = _hold(old, self.reload_settings())
        listeners, added = _relisten(current, fresh)
        digest = self.tls_digest
        try:
            plan = self.plan(fresh, listeners, current)
        except BaseException:
            for listener in added:
                listener.close()
            raise
        plan.changes = tuple(_changes(current, plan) + _tls_files_changed(old, fresh, digest, self.tls_digest))
        plan.held = tuple(held)
        return plan


def _hold(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """*new*, less the changes a reload cannot apply; and those changes, each with why not."""
    held = {name: why for name, why in held_on_reload().items() if getattr(old, name) != getattr(new, name)}
    lines = [f"{name}: {_text(name, getattr(old, name))} -> {_text(name, getattr(new, name))}: {why}"
             for name, why in held.items()]
    return dataclasses.replace(new, **{name: getattr(old, name) for name in held}), lines


def _relisten(current: Plan, settings: Settings) -> tuple[list[Listener], list[Listener]]:
    """The listeners of *settings*: those already held kept (by address), the rest bound now.

    Returns them all, in the order of ``bind``, and the ones bound now. A listener kept with
    another allow-list shares the socket. Kept ones take the new backlog and Unix socket
    file owner and mode. ListenerError or ConfigError when something cannot be bound.
    """
    held: dict[str, list[Listener]] = {}
    for listener in current.listeners:
        held.setdefault(listener.spec.address_text, []).append(listener)
    specs = [parse_bind(text) for text in settings.bind]
    options: dict[str, Any] = dict(backlog=settings.backlog or None, reuse_port=settings.reuse_port,
                                   unix_mode=settings.unix_mode, unix_owner=settings.unix_owner,
                                   unix_group=settings.unix_group)
    fresh = iter(bind_all([spec for spec in specs if spec.address_text not in held], **options))
    added: list[Listener] = []
    listeners: list[Listener] = []
    for spec in specs:
        if spec.address_text in held:
            kept = [listener.with_spec(spec) for listener in held[spec.address_text]]
            reconfigure(kept, **options)
            listeners += kept
        else:
            new = next(fresh)
            added.append(new)
            listeners.append(new)
    return listeners, added


def _changes(current: Plan, new: Plan) -> list[str]:
    """One line per setting that differs: "workers: 2 -> 3", "bind: +udp://127.0.0.1:9000"."""
    old_names = [listener.spec.text for listener in current.listeners]
    new_names = [listener.spec.text for listener in new.listeners]
    lines = []
    for field in dataclasses.fields(Settings):
        name = field.name
        before, after = getattr(current.settings, name), getattr(new.settings, name)
        if name == "bind":
            diff = [f"+{n}" for n in new_names if n not in old_names] + [f"-{n}" for n in old_names if n not in new_names]
            if diff:
                lines.append(f"bind: {' '.join(diff)}")
        elif before != after:
            lines.append(f"{name}: {_text(name, before)} -> {_text(name, after)}")
    return lines


def _tls_files_changed(old: Settings, new: Settings, before: str, after: str) -> list[str]:
    """A line when the TLS files changed in place (same paths, new contents): a rotation."""
    paths = ("certfile", "keyfile", "ca_certs")
    if not before or not after or before == after or any(getattr(old, p) != getattr(new, p) for p in paths):
        return []
    return ["certfile, keyfile, ca_certs: new contents, served by the new workers"]


def _settings_of(plan: Plan) -> Settings:
    """The settings *plan* was made from: a Settings, as every plan here (the arbiter reads them
    through its MasterSettings Protocol)."""
    settings = plan.settings
    assert isinstance(settings, Settings)
    return settings


def _text(name: str, value: Any) -> str:
    return "unset" if value is None else format_value(name, value)


def _access_log(settings: Settings, current: Plan | None) -> log_files.AccessLog | None:
    """The access log for *settings*: the current plan's if it writes the same way, else opened now."""
    if current is not None and current.spec.access_log is not None:
        before = _settings_of(current)
        if (before.access_log, before.log_format) == (settings.access_log, settings.log_format):
            return current.spec.access_log
    return log_files.AccessLog.from_settings(settings)  # opened now: a bad path fails before fork


def _enter(settings: Settings, name: str) -> None:
    """The master's own part of a plan: umask, process title, and (if prefork set them up) logs."""
    if settings.umask is not None:
        os.umask(settings.umask)
    from prefork.proctitle import set_title

    set_title("master", name)
    if log_files.configured():
        log_files.setup(settings)


class _Builder(Protocol):
    """What builds a generation's servers, in each worker, from its listeners."""

    def configured(self, settings: Settings) -> _Builder:
        """The builder for a generation with *settings*."""

    def check(self, listeners: Sequence[Listener]) -> None:
        """Raise AppLoadError, before any fork, if the servers cannot be built for *listeners*."""

    def __call__(self, listeners: Sequence[Listener]) -> list[LoopServer]:
        """Called in the worker: the servers, one per listener."""


class _ItSelf:
    """The builder of PreforkMixIn: the very server object, inherited by each worker."""

    def __init__(self, server: LoopServer) -> None:
        self.server = server

    def configured(self, settings: Settings) -> _ItSelf:
        return self

    def check(self, listeners: Sequence[Listener]) -> None:
        """Nothing to check: the server was built around its listener."""

    def __call__(self, listeners: Sequence[Listener]) -> list[LoopServer]:
        return [self.server]


class _ServerBuilder:
    """Builds, in a worker, one server per listener around the inherited sockets."""

    def __init__(self, app: Any, server_class: type[BaseServer] | None, service_options: dict[str, Any],
                 mode: str = "sync", threads: int = 1, settings: Settings | None = None) -> None:
        self.app = app
        self.server_class = server_class
        self.mode = mode
        self.threads = threads
        self.service_options = service_options
        self.settings = settings

    def configured(self, settings: Settings) -> _ServerBuilder:
        """The same app and options, with the mode, threads and settings of *settings*."""
        return _ServerBuilder(self.app, self.server_class, self.service_options, settings.mode, settings.threads,
                              settings)

    def __call__(self, listeners: Sequence[Listener]) -> list[LoopServer]:
        """Called in the worker: load the app (unless preloaded) and wrap each listener."""
        app = self.service(load_object(self.app)) if isinstance(self.app, str) else self.app
        return [self._build(app, listener) for listener in listeners]

    def service(self, loaded: Any) -> Any:
        """The service a loaded object offers: what its configure() returns, or itself."""
        configure = _own_configure(loaded)
        if configure is None:
            if self.service_options:
                names = ", ".join(sorted(self.service_options))
                raise AppLoadError(f"{_app_name(loaded)} takes no service options (given: {names})")
            return loaded
        options = dict(self.service_options)
        if self.settings is not None and "settings" in inspect.signature(configure).parameters:
            options["settings"] = self.settings  # a service that reads settings (the HTTP limits) gets them
        try:
            return configure(**options)
        except TypeError as exc:
            raise AppLoadError(f"{_app_name(loaded)}: bad service options {self.service_options}: {exc}") from exc

    def check(self, listeners: Sequence[Listener]) -> None:
        """Each listener has its handler in the app; an app named by a string is checked in the worker."""
        if isinstance(self.app, str):
            return
        find = async_handler_for if self.mode == "asyncio" else handler_for
        for listener in listeners:
            find(self.app, listener)

    def handlers(self, listeners: Sequence[Listener]) -> list[Any]:
        """Called in an asyncio-mode worker: load the app (unless preloaded), its handler per listener."""
        app = self.service(load_object(self.app)) if isinstance(self.app, str) else self.app
        return [async_handler_for(app, listener) for listener in listeners]

    def _build(self, app: Any, listener: Listener) -> LoopServer:
        handler = handler_for(app, listener)
        if listener.is_stream:
            base = self.server_class or getattr(app, "server_class", None) or TCPServer
        else:
            base = getattr(app, "datagram_server_class", None) or UDPServer
        cls = server_class_for(self.mode, base, self.threads)
        return cls.from_socket(listener.sock, handler)  # type: ignore[attr-defined,no-any-return]


def _own_configure(loaded: Any) -> Callable[..., Any] | None:
    """The service's configure(): a module's own (not one it imported), or an object's."""
    if isinstance(loaded, type):
        return None
    configure = getattr(loaded, "configure", None)
    if isinstance(loaded, types.ModuleType) and getattr(configure, "__module__", None) != loaded.__name__:
        return None
    return configure if callable(configure) else None


def handler_for(app: Any, listener: Listener) -> Any:
    """The request handler class that *app* offers for *listener*, or AppLoadError saying why not."""
    kind, attr = ("stream", "StreamHandler") if listener.is_stream else ("datagram", "DatagramHandler")
    _refuse_asyncio_handler(app, getattr(app, attr, None), attr)
    if isinstance(app, type):
        wrong = DatagramRequestHandler if listener.is_stream else StreamRequestHandler
        if issubclass(app, wrong):
            raise AppLoadError(f"{app.__module__}.{app.__qualname__} is a {wrong.__name__}; it cannot "
                               f"serve the {kind} listener {listener.name}")
        return app
    handler = getattr(app, attr, None)
    if handler is None:
        raise AppLoadError(f"{_app_name(app)} has no {attr}, so it cannot serve the {kind} listener {listener.name}")
    return handler


# The names under which a service offers its asyncio handlers (see prefork.aio).
ASYNC_HANDLER_NAMES = {True: "AsyncStreamHandler", False: "AsyncDatagramHandler"}


def async_handler_for(app: Any, listener: Listener) -> Any:
    """mode = "asyncio": the asyncio handler *app* offers for *listener*, or AppLoadError saying
    which kind of handler was found instead."""
    kind = "stream" if listener.is_stream else "datagram"
    attr, sync_attr = ASYNC_HANDLER_NAMES[listener.is_stream], "StreamHandler" if listener.is_stream else "DatagramHandler"
    found, where = app, _app_name(app)
    if async_kind(app) is None and (_is_sync_handler(app) or inspect.isfunction(app)):
        raise AppLoadError(f"mode asyncio: {where} is {describe(app)}; serve it with mode sync, thread or fork, "
                           f"or give an asyncio handler (see prefork.aio)")
    if async_kind(app) is None:
        found, where = getattr(app, attr, None), f"{_app_name(app)}.{attr}"
        if found is None:
            sync = getattr(app, sync_attr, None)
            also = f" (its {sync_attr} is {describe(sync)}: serve that with mode sync, thread or fork)" if sync else ""
            raise AppLoadError(f"mode asyncio: {_app_name(app)} has no {attr}, so it cannot serve the {kind} "
                               f"listener {listener.name}{also}")
    if async_kind(found) != kind:
        raise AppLoadError(f"mode asyncio: {where} is {describe(found)}; it cannot serve the {kind} "
                           f"listener {listener.name}")
    return found


def _is_sync_handler(app: Any) -> bool:
    return isinstance(app, type) and issubclass(app, BaseRequestHandler)


def _refuse_asyncio_handler(app: Any, offered: Any, attr: str) -> None:
    """A synchronous mode given an asyncio handler: AppLoadError saying so."""
    for candidate, where in ((app, _app_name(app)), (offered, f"{_app_name(app)}.{attr}")):
        if candidate is not None and async_kind(candidate) is not None:
            raise AppLoadError(f"{where} is {describe(candidate)}; serve it with mode asyncio")
    if offered is None and not isinstance(app, type):
        async_attr = "Async" + attr
        if getattr(app, async_attr, None) is not None:
            raise AppLoadError(f"{_app_name(app)} has no {attr}, only {async_attr} (an asyncio handler): "
                               "serve it with mode asyncio")


def _worker_spec(settings: Settings, listeners: Sequence[Listener], build: _Builder,
                 name: str, hooks: Hooks, access_log: log_files.AccessLog | None) -> WorkerSpec:
    from prefork.proctitle import set_title
    from prefork.privileges import check_reach, privilege_dropper

    switch = privilege_dropper(settings.user, settings.group)
    check_reach(switch, os.getcwd(), [path for path in (settings.error_log, settings.access_log)
                                      if path not in (None, "-")])
    return WorkerSpec(
        listeners=listeners,
        build_servers=build,
        name=name,
        graceful_timeout=settings.graceful_timeout,
        master_pid=os.getpid(),
        reuse_port=settings.reuse_port,
        rebind=rebind_reuse_port,
        drop_privileges=switch,
        post_fork=hooks.post_fork,
        on_reopen_logs=log_files.reopen,
        set_title=lambda number, generation: set_title("worker", name, number, generation),
        access_log=access_log,
        read_timeout=settings.read_timeout,
        tls_context=_tls_context(settings, listeners),
        proxy_allow=() if settings.proxy_allow_ips == ["*"] else parse_networks(settings.proxy_allow_ips, "proxy_allow_ips"),
        handshake_timeout=settings.handshake_timeout,
        event_loop=_event_loop(settings, listeners, build),
    )


def _tls_context(settings: Settings, listeners: Sequence[Listener]) -> ssl.SSLContext | None:
    """The context of the ?tls listeners, built from the files now (prefork.tls rule 1); None without any.

    ConfigError (exit 2, or a refused reload) names the file or the listener at fault.
    """
    for listener in listeners:
        if (listener.spec.tls or listener.spec.proxy) and not listener.is_stream:
            raise ConfigError(f"setting 'bind': {listener.spec.text}: ?tls and ?proxy apply to stream "
                              f"sockets, and {listener.name} is a datagram socket")
    tls = [listener.name for listener in listeners if listener.spec.tls]
    if not tls:
        if settings.certfile:
            log.warning("certfile is set but no listener has ?tls: nothing is served over TLS")
        return None
    if not settings.certfile:
        raise ConfigError(f"setting 'certfile': {tls[0]} has ?tls, so set certfile (and keyfile) to its "
                          "certificate and key")
    password = key_password(settings.key_password_file, settings.key_password_env)
    return build_context(settings.certfile, settings.keyfile, password, ca_certs=settings.ca_certs,
                         cert_reqs=settings.cert_reqs, min_version=settings.tls_min_version,
                         ciphers=settings.ciphers, alpn_protocols=settings.alpn_protocols)


def _event_loop(settings: Settings, listeners: Sequence[Listener], build: _Builder) -> Any:
    """mode = "asyncio": what builds each worker's event loop (prefork.aioworker); else None."""
    if settings.mode != "asyncio":
        return None
    if not isinstance(build, _ServerBuilder):
        raise ConfigError("mode asyncio serves an app given to serve() or the command line, not a PreforkMixIn "
                          "server: use mode sync, thread or fork")
    _prepare_asyncio(settings)  # at start and on a reload to asyncio mode
    options = LoopOptions(settings.loop, settings.idle_timeout, settings.timeout, settings.backlog)
    return event_loop_factory(build.handlers, options)


def _hooks(settings: Settings) -> Hooks:
    resolved = {}
    for name in _HOOKS:
        value = getattr(settings, name)
        try:
            resolved[name] = load_object(value) if isinstance(value, str) else value
        except AppLoadError as exc:
            raise AppLoadError(f"setting {name!r}: {exc}") from exc
    return Hooks(**resolved)


def _app_name(app: Any) -> str:
    if isinstance(app, str):
        return service_name(app)
    if isinstance(app, types.ModuleType):
        return app.__name__.rpartition(".")[2]
    return getattr(app, "__name__", type(app).__name__)


# Sockets handed over by the master we replace (USR2), read once per process and taken by the
# servers that match them.
_inherited: dict[str, Any] | None = None


def _take_inherited(server: Any) -> Any:
    """The socket a replaced master handed over for this server's address, if any."""
    global _inherited
    if _inherited is None:
        _inherited = dict(inherited_listeners(os.environ))
        os.environ.pop(FDS_ENV, None)
    for key, sock in list(_inherited.items()):
        if sock.family == server.address_family and sock.type == server.socket_type \
                and _same_address(sock.getsockname(), server.server_address):
            return _inherited.pop(key)
    return None


def _same_address(bound: Any, wanted: Any) -> bool:
    """True if a socket bound to *bound* is what binding *wanted* gave (port 0 took any port)."""
    if isinstance(wanted, tuple) and isinstance(bound, tuple):
        host_ok = wanted[0] in ("", bound[0])
        return host_ok and wanted[1] in (0, bound[1])
    return bool(bound == wanted)
