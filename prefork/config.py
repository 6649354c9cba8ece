"""The one declaration of every setting, and where their values come from. Runs in: master.

Rules:

1. A setting exists once, here, as a field of ``Settings`` with its type, default, validator and
   help. Its command-line flag (``--max-requests``; ``--preload/--no-preload`` for a switch), its
   environment variable (``PREFORK_MAX_REQUESTS``), its TOML key (``max_requests``), the README's
   settings table and ``deploy/prefork.toml`` are all derived from the field; nothing else
   declares a setting.
2. Precedence: defaults < config file (``-c FILE``, else ``[tool.prefork]`` in ./pyproject.toml)
   < environment (``PREFORK_*``) < command line. ``load`` also says where each value came from.
3. An unknown key, variable or flag is an error that names the closest valid one. A value of the
   wrong type or out of range is an error that names the setting, the value, where it was given
   and what is allowed. Both are ``ConfigError`` (exit code 2), shown without a traceback.
4. Nothing is read from the environment or the disk at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

from prefork.errors import ConfigError
from prefork.handover import FDS_ENV, UPGRADE_PARENT_ENV
from prefork.setting_types import (  # the checks and parsers the declarations below use
    ADDRESS,
    BOOL,
    HOOK,
    KIND_BY_TYPE,
    MODE,
    SIZE,
    TEXT_LIST,
    WORD,
    Kind,
    NotAllowed,
    check_at_least,
    check_bind_list,
    check_boolean,
    check_hook,
    check_integer,
    check_metrics_address,
    check_mode,
    check_networks,
    check_name_or_id,
    check_networks,
    check_one_of,
    check_one_of_any_case,
    check_optional,
    check_path,
    check_path_or_dash,
    check_text,
    check_text_list,
    toml_plain,
)

__all__ = [
    "Settings",
    "Option",
    "settings_fields",
    "make_settings",
    "options",
    "argument_parser",
    "value_flags",
    "unknown_option",
    "load",
    "format_value",
    "ENV_PREFIX",
    "RESERVED_ENV",
    "FALLBACK_BIND",
    "MAX_WORKERS",
    "MAX_SECONDS",
    "TABLE_START",
    "TABLE_END",
    "held_on_reload",
]

_Validator = Callable[[str, Any], Any]

# Environment variables named PREFORK_<SETTING> set settings.
ENV_PREFIX = "PREFORK_"
# PREFORK_* variables that are not settings: prefork sets them itself for a master it starts on
# an upgrade (prefork.handover: the inherited sockets and the master being replaced).
RESERVED_ENV = frozenset({FDS_ENV, UPGRADE_PARENT_ENV})
# Where `bind` comes from when nothing sets it and the service declares no DEFAULT_BIND.
FALLBACK_BIND = "tcp://127.0.0.1:8000"
# Markers around the generated settings table in README.md.
TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"
# argparse's refusal of a value given to a switch (--preload=yes); the value is a repr.
_SWITCH_VALUE = re.compile(r"argument (--[\w-]+)/(--no-[\w-]+): ignored explicit argument (.*)", re.DOTALL)
# The most workers a setting may ask for: one less than the scoreboard's slots
# (prefork.arbiter.SCOREBOARD_CAPACITY; `prefork scale` has the same bound). More would be
# forked up to the capacity and the master would wait for the rest, never ready; and replacing
# a worker (reload, recycling) starts its successor first, in a slot of its own.
MAX_WORKERS = 1023
# The longest duration a seconds setting may have: Python turns timeouts into 64-bit
# nanoseconds (at most about 9.2e9 s) and a socket timeout above that fails on every
# connection. 1e9 s (31 years) means "never" for every purpose.
MAX_SECONDS = 1e9




def _setting(default: Any, help: str, validate: _Validator | None = None, *, factory: bool = False,
             section: str = "workers", kind: Kind | None = None, short: str | None = None,
             default_text: str | None = None, sample: Any = None, deploy: Any = None,
             reload: str | None = None) -> Any:
    """A field of Settings. *sample* is an example value for a setting unset by default;
    *deploy* a value that deploy/prefork.toml sets (instead of showing the default commented out);
    *reload*, for a setting that a reload (HUP) cannot apply, why not and how to apply it."""
    metadata = {"help": help, "validate": validate, "section": section, "kind": kind, "short": short,
                "default_text": default_text, "sample": sample, "deploy": deploy, "reload": reload}
    if factory:
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_HOOK_SAMPLE = "myservice.hooks:function"
# Why a reload cannot apply a change to how listeners are bound.
_RESTART_LISTENERS = ("every listener would be bound anew, with or without SO_REUSEPORT; restart the "
                      "service")


@dataclasses.dataclass
class Settings:
    """Every setting of a prefork service; validated on construction."""

    # -- listeners
    bind: list[str] = _setting(list, "listeners: tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, "
                               "unix-dgram:PATH, fd://N, systemd[:NAME]; all but the unix ones may end "
                               "in ?allow=NETWORK[,NETWORK...] (only those clients are served); a "
                               "stream listener whose protocol has the server speak first takes "
                               "?first=server; repeat the flag for several",
                               check_bind_list, factory=True, section="listeners", short="-b",
                               default_text=f"the service's DEFAULT_BIND, else {FALLBACK_BIND}",
                               deploy=[FALLBACK_BIND])
    backlog: int = _setting(0, "listen backlog; 0 means as large as the OS allows (somaxconn)",
                            check_integer(0), section="listeners")
    reuse_port: bool = _setting(False, "each worker binds its own SO_REUSEPORT socket (kernel balancing; "
                                "a stopping worker's queued connections are lost)", check_boolean,
                                section="listeners", reload=_RESTART_LISTENERS)
    unix_mode: int | None = _setting(None, "file mode of Unix socket files, e.g. 0o660", check_mode,
                                     section="listeners", kind=MODE, sample=0o660)
    unix_owner: str | int | None = _setting(None, "owner of Unix socket files", check_name_or_id,
                                            section="listeners", sample="www-data")
    unix_group: str | int | None = _setting(None, "group of Unix socket files", check_name_or_id,
                                            section="listeners", sample="www-data")
    proxy_allow_ips: list[str] = _setting(lambda: ["127.0.0.1/32", "::1/128"],
                                          "networks whose peers may send a PROXY protocol header on "
                                          "?proxy listeners (your balancers); * alone: any peer",
                                          check_networks, factory=True, section="listeners",
                                          default_text="127.0.0.1/32, ::1/128 (loopback)")
    handshake_timeout: float = _setting(5.0, "seconds a connection to a ?proxy or ?tls listener has for its "
                                        "PROXY header and TLS handshake (in the worker, without blocking it); "
                                        "0 means no limit", check_at_least(0, MAX_SECONDS), section="listeners")
    # -- tls
    certfile: str | None = _setting(None, "PEM certificate (chain) of ?tls listeners; read by the master at "
                                    "start and on reload (HUP), which rotates it", check_optional(check_path),
                                    section="tls", sample="/etc/prefork/tls/cert.pem")
    keyfile: str | None = _setting(None, "PEM private key of certfile; unset: the key is in certfile",
                                   check_optional(check_path), section="tls", sample="/etc/prefork/tls/key.pem")
    key_password_file: str | None = _setting(None, "file whose first line is keyfile's password (never give "
                                             "the password itself on the command line)",
                                             check_optional(check_path), section="tls",
                                             sample="/etc/prefork/tls/key.pass")
    key_password_env: str | None = _setting(None, "name of an environment variable with keyfile's password",
                                            check_optional(check_text), section="tls", sample="TLS_KEY_PASSWORD")
    ca_certs: str | None = _setting(None, "PEM CA certificates to check client certificates against "
                                    "(mutual TLS, see cert_reqs)", check_optional(check_path), section="tls",
                                    sample="/etc/prefork/tls/clients-ca.pem")
    cert_reqs: str = _setting("none", "client certificates: none (not asked for), optional (checked if "
                              "sent), required (mutual TLS)", check_one_of("none", "optional", "required"),
                              section="tls", kind=WORD)
    tls_min_version: str = _setting("tlsv1.2", "least TLS version accepted: TLSv1.2 or TLSv1.3 (any case)",
                                    check_one_of_any_case("tlsv1.2", "tlsv1.3"), section="tls", kind=WORD)
    ciphers: str | None = _setting(None, "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); "
                                   "unset: Python's defaults", check_optional(check_text), section="tls",
                                   sample="ECDHE+AESGCM:ECDHE+CHACHA20")
    alpn_protocols: list[str] = _setting(list, "ALPN protocols offered, in order of preference, e.g. http/1.1",
                                         check_text_list, factory=True, section="tls", sample=["http/1.1"])
    # -- workers
    workers: int = _setting(_cpu_count, "number of worker processes", check_integer(0, MAX_WORKERS),
                            factory=True, short="-w", default_text="the number of usable CPUs")
    mode: str = _setting("sync", "what runs inside each worker: sync (one request at a time), "
                         "thread (a thread per request, at most `threads`), fork (a process per request), "
                         "asyncio (one event loop, async handlers)",
                         check_one_of("sync", "thread", "fork", "asyncio"), kind=WORD)
    loop: str = _setting("auto", "asyncio mode: the event loop; auto takes uvloop when it is installed",
                         check_one_of("auto", "asyncio", "uvloop"), kind=WORD)
    idle_timeout: float = _setting(0.0, "asyncio mode: close a connection after this many seconds without "
                                   "a byte in or out; 0 means never", check_at_least(0, MAX_SECONDS))
    threads: int = _setting(16, "most concurrent request threads per worker in thread mode", check_integer(1))
    wsgi: bool = _setting(False, "APP is a WSGI callable (module:callable), served by the bundled "
                          "workers.wsgi", check_boolean,
                          reload="the master reads APP as a service or a WSGI callable when it starts; "
                                 "apply with `prefork upgrade`")
    max_workers: int = _setting(0, "adaptive pool: upper bound; 0 keeps the pool at `workers`",
                                check_integer(0, MAX_WORKERS))
    min_workers: int = _setting(1, "adaptive pool: lower bound", check_integer(1, MAX_WORKERS))
    min_spare: int = _setting(1, "adaptive pool: start workers while fewer than this are idle", check_integer(0))
    max_spare: int = _setting(4, "adaptive pool: stop workers while more than this are idle", check_integer(1))
    read_timeout: float = _setting(0.0, "seconds a connection may stay silent before the worker drops "
                                   "it (also while it waits for its first message); 0 means never",
                                   check_at_least(0, MAX_SECONDS))
    # -- http (the bundled HTTP services, workers.http and workers.wsgi)
    max_request_line: int = _setting(8190, "longest request target accepted (longer: 414)",
                                     check_integer(1), section="http")
    max_header_count: int = _setting(100, "most header fields in a request (more: 431)", check_integer(1),
                                     section="http")
    max_header_bytes: int = _setting(64 * 1024, "largest request header section (larger: 431)",
                                     check_integer(1), kind=SIZE, section="http")
    max_body_size: int = _setting(0, "largest request body (larger: 413, before it is read); 0 means "
                                  "no limit", check_integer(0), kind=SIZE, section="http")
    forwarded_allow_ips: list[str] = _setting(lambda: ["127.0.0.1/32", "::1/128"],
                                              "peers (addresses or networks) whose Forwarded and "
                                              "X-Forwarded-For/-Proto/-Host headers set the client's "
                                              "address and scheme; * for any (only behind a proxy that "
                                              "sets them); others' are ignored",
                                              check_networks, factory=True, section="http",
                                              default_text="127.0.0.1/32, ::1/128 (loopback)",
                                              sample=["10.0.0.0/8"])
    # -- supervision
    timeout: float = _setting(30.0, "seconds a worker may spend on one request (asyncio mode: its event "
                              "loop may stand still) before it is killed (its traceback logged first); "
                              "0 disables", check_at_least(0, MAX_SECONDS),
                              short="-t", section="supervision")
    graceful_timeout: float = _setting(30.0, "seconds a stopping worker gets to finish before SIGKILL",
                                       check_at_least(0, MAX_SECONDS), section="supervision")
    max_requests: int = _setting(0, "recycle a worker after this many requests; 0 disables", check_integer(0),
                                 section="supervision")
    max_requests_jitter: int = _setting(0, "add up to this many requests at random to max_requests, "
                                        "so workers do not recycle together", check_integer(0),
                                        section="supervision")
    max_worker_memory: int = _setting(0, "recycle a worker whose RSS exceeds this size; 0 disables",
                                      check_integer(0), kind=SIZE, section="supervision")
    max_worker_lifetime: float = _setting(0.0, "recycle a worker after this many seconds; 0 disables",
                                          check_at_least(0, MAX_SECONDS), section="supervision")
    crash_limit: int = _setting(10, "halt (exit 3) after this many workers in a row died before serving "
                                "a request; 0 never halts", check_integer(0), section="supervision")
    crash_timeout: float = _setting(60.0, "halt (exit 3) when workers have kept dying before serving for "
                                    "this many seconds; 0 never halts", check_at_least(0, MAX_SECONDS),
                                    section="supervision")
    preload: bool = _setting(False, "import the app in the master and gc.freeze() before forking "
                             "(then a reload does not load new code)", check_boolean, section="supervision",
                             reload="the app is imported in the master, once; apply with `prefork upgrade`")
    # -- process
    name: str = _setting("", "service name shown in process titles", check_text, section="process",
                         short="-n", default_text="the app's name")
    pidfile: str | None = _setting(None, "write the master's pid here (atomically); removed on stop; "
                                   "`prefork status` and the control commands find the master by it",
                                   check_optional(check_path), section="process", short="-p",
                                   deploy="/run/prefork/prefork.pid",
                                   default_text="prefork run: NAME.pid in a directory per user (see Command line)",
                                   reload="the control commands find the master by it; restart the service")
    user: str | int | None = _setting(None, "run workers as this user (the master binds first)",
                                      check_name_or_id, section="process", sample="www-data")
    group: str | int | None = _setting(None, "run workers as this group", check_name_or_id, section="process",
                                       sample="www-data")
    umask: int | None = _setting(None, "umask of master and workers, e.g. 0o027", check_mode, section="process",
                                 kind=MODE, sample=0o027)
    # -- logging and metrics
    loglevel: str = _setting("info", "least severity written to the error log: debug, info, warning, "
                             "error or critical",
                             check_one_of("debug", "info", "warning", "error", "critical"), section="logging",
                             kind=WORD)
    error_log: str = _setting("-", 'where the error log goes: "-" for stderr, or a file (reopened on USR1)',
                              check_path_or_dash, section="logging")
    access_log: str | None = _setting(None, 'where the access log goes, one line per request: "-" for '
                                      "stdout, or a file (reopened on USR1); unset: no access log",
                                      check_optional(check_path_or_dash), section="logging", sample="-")
    log_format: str = _setting("text", "format of both logs: text, or json (one object per line)",
                               check_one_of("text", "json"), section="logging", kind=WORD)
    metrics_bind: str | None = _setting(None, "serve Prometheus metrics on tcp://HOST:PORT, from a small "
                                        "process of its own; unset: no metrics", check_metrics_address,
                                        section="logging", kind=ADDRESS, sample="tcp://127.0.0.1:9100")
    # -- hooks
    on_starting: Any = _setting(None, "called in the master before the listeners are bound", check_hook,
                                section="hooks", kind=HOOK, sample=_HOOK_SAMPLE,
                                reload="it runs once, when the master starts; the next start or "
                                       "`prefork upgrade` runs the new one")
    when_ready: Any = _setting(None, "called in the master once every worker accepts", check_hook,
                               section="hooks", kind=HOOK, sample=_HOOK_SAMPLE)
    pre_fork: Any = _setting(None, "called in the master before each worker is forked", check_hook,
                             section="hooks", kind=HOOK, sample=_HOOK_SAMPLE)
    post_fork: Any = _setting(None, "called in each worker right after fork", check_hook, section="hooks",
                              kind=HOOK, sample=_HOOK_SAMPLE)
    worker_exit: Any = _setting(None, "called in the master when a worker has exited", check_hook,
                                section="hooks", kind=HOOK, sample=_HOOK_SAMPLE)
    on_exit: Any = _setting(None, "called in the master just before it exits", check_hook, section="hooks",
                            kind=HOOK, sample=_HOOK_SAMPLE)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            validate = field.metadata.get("validate")
            if validate is not None:
                setattr(self, field.name, validate(field.name, getattr(self, field.name)))
        self._check_relations()

    def _check_relations(self) -> None:
        if self.max_workers and self.max_workers < self.min_workers:
            raise ConfigError(
                f"setting 'max_workers': {self.max_workers} is below min_workers={self.min_workers}")
        if self.max_workers and self.max_spare < self.min_spare:
            raise ConfigError(f"setting 'max_spare': {self.max_spare} is below min_spare={self.min_spare}")

    @property
    def adaptive(self) -> bool:
        return self.max_workers > 0


def held_on_reload() -> dict[str, str]:
    """The settings a reload cannot apply: name -> why not, and how to apply a change."""
    return {f.name: f.metadata["reload"] for f in settings_fields() if f.metadata.get("reload")}


def settings_fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def make_settings(values: Mapping[str, Any]) -> Settings:
    """Settings from a mapping; an unknown key is a ConfigError that suggests the closest name."""
    known = {f.name for f in settings_fields()}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}{_did_you_mean(key, known)}")
    return Settings(**values)


# -- the names derived from each field ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting as the outside world names it."""

    name: str  # the field, and the TOML key
    kind: Kind
    help: str
    section: str
    validate: _Validator | None
    flag: str  # --max-requests
    short: str | None  # -w
    env: str  # PREFORK_MAX_REQUESTS
    default: Any  # the default value; None for one computed at run time (see default_text)
    default_text: str | None  # what the default is, where a value cannot say it
    sample: Any
    deploy: Any

    def accept(self, raw: Any, parse: Callable[[Any], Any], where: str) -> Any:
        """*raw* parsed and validated; ConfigError naming setting, value, what is allowed and *where*."""
        try:
            value = parse(raw)
        except (ValueError, TypeError) as exc:
            raise self._refused(raw, self.kind.allowed, where) from exc
        if self.validate is None:
            return value
        try:
            return self.validate(self.name, value)
        except NotAllowed as exc:
            raise self._refused(raw, exc.expected, where) from exc  # the value as the user wrote it
        except ConfigError as exc:  # a bind spec's own error: say which setting holds it
            named = str(exc) if str(exc).startswith("setting ") else f"setting {self.name!r}: {exc}"
            raise type(exc)(f"{named} ({where})") from exc

    def _refused(self, raw: Any, expected: str, where: str) -> ConfigError:
        return ConfigError(f"setting {self.name!r}: {raw!r} is not allowed; expected {expected} ({where})")

    def describe_default(self) -> str:
        return self.default_text or format_value(self.name, self.default)


@functools.cache
def options() -> tuple[Option, ...]:
    """Every setting, in declaration order."""
    return tuple(_option(field) for field in settings_fields())


def _option(field: dataclasses.Field[Any]) -> Option:
    meta = field.metadata
    kind = meta["kind"] or KIND_BY_TYPE.get(str(field.type))
    if kind is None:
        raise TypeError(f"setting {field.name!r}: no parser for {field.type}; give kind= in _setting()")
    default = field.default if field.default is not dataclasses.MISSING else None
    return Option(field.name, kind, meta["help"], meta["section"], meta["validate"],
                  "--" + field.name.replace("_", "-"), meta["short"], ENV_PREFIX + field.name.upper(),
                  default, meta["default_text"], meta["sample"], meta["deploy"])


@functools.cache
def _by_name() -> dict[str, Option]:
    return {opt.name: opt for opt in options()}


def format_value(name: str, value: Any) -> str:
    """*value* of setting *name* as it would be written in TOML; 'unset' for None."""
    if value is None:
        return "unset"
    if callable(value):  # a hook given through the Python API
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"
    option = _by_name().get(name)
    return option.kind.to_toml(value) if option else toml_plain(value)


def _did_you_mean(word: str, candidates: Iterable[str], quote: bool = True) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1)
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" if quote else f"; did you mean {close[0]}?"


# -- the command line -------------------------------------------------------------------------


class _ErrorRaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are ConfigErrors (exit code 2), not sys.exit()."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{_switch_value_error(message) or message} (see {self.prog} --help)")


def _switch_value_error(message: str) -> str | None:
    """argparse's "argument --x/--no-x: ignored explicit argument 'v'" said in settings' terms."""
    match = _SWITCH_VALUE.fullmatch(message)
    if match is None:
        return None
    on, off, value = match.groups()
    name = on[2:].replace("-", "_")
    return (f"setting {name!r} is a switch and takes no value (given {value}): write {on} for true "
            f"or {off} for false")


def argument_parser(prog: str = "prefork", parents: Sequence[argparse.ArgumentParser] = (),
                    **kwargs: Any) -> argparse.ArgumentParser:
    """A parser with ``-c/--config`` and a flag for every setting; only given flags are set."""
    parser = _ErrorRaisingParser(prog=prog, allow_abbrev=False, parents=list(parents), **kwargs)
    parser.add_argument("-c", "--config", metavar="FILE", default=None,
                        help="TOML config file (default: [tool.prefork] in ./pyproject.toml, if any)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options():
        if option.section not in groups:
            groups[option.section] = parser.add_argument_group(f"settings: {option.section}")
        _add_flag(groups[option.section], option)
    return parser


def _add_flag(group: argparse._ArgumentGroup, option: Option) -> None:
    flags = [option.short, option.flag] if option.short else [option.flag]
    help_text = f"{option.help} (default: {option.describe_default()}; env {option.env})".replace("%", "%%")
    common: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS, "help": help_text}
    if option.kind is BOOL:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
    elif option.kind is TEXT_LIST:
        group.add_argument(*flags, action="append", metavar=option.kind.metavar, **common)
    else:
        group.add_argument(*flags, metavar=option.kind.metavar, **common)


def value_flags() -> dict[str, bool]:
    """Every flag of ``argument_parser`` and whether it takes a value (for splitting a command line)."""
    flags = {"-c": True, "--config": True, "-h": False, "--help": False}
    for option in options():
        takes_value = option.kind is not BOOL
        flags[option.flag] = takes_value
        if option.short:
            flags[option.short] = takes_value
        if not takes_value:
            flags["--no-" + option.flag[2:]] = False
    return flags


def unknown_option(extras: Sequence[str]) -> ConfigError:
    """The error for arguments no flag takes: names the first and the closest flag."""
    first = next((arg for arg in extras if arg.startswith("-")), None)
    if first is None:
        return ConfigError(f"unexpected argument {extras[0]!r}")
    flag = first.partition("=")[0]
    return ConfigError(f"unknown option {flag!r}{_did_you_mean(flag, value_flags())}")


def _from_argv(argv: Sequence[str]) -> tuple[dict[str, tuple[Any, str]], str | None]:
    namespace, extras = argument_parser().parse_known_args(list(argv))
    if extras:
        raise unknown_option(extras)
    given = {name: _dashes(raw) for name, raw in vars(namespace).items()}
    config_file = given.pop("config", None)
    layer = {}
    for name, raw in given.items():
        option = _by_name()[name]
        where = f"command line {option.flag}"
        layer[name] = (option.accept(raw, _cli_parser(option), where), "command line")
    return layer, config_file


def _dashes(raw: Any) -> Any:
    """argparse hands ``--flag=--`` over as [] (it drops a "--" it takes for the end of the
    options): the value given was the text "--"."""
    if raw == []:
        return "--"
    if isinstance(raw, list):  # a repeated flag (bind): one value per occurrence
        return ["--" if item == [] else item for item in raw]
    return raw


def _cli_parser(option: Option) -> Callable[[Any], Any]:
    if option.kind is BOOL:
        return lambda value: value  # argparse gave True or False
    if option.kind is TEXT_LIST:
        return list  # one item per occurrence of the flag, commas and all
    return option.kind.from_text


# -- the environment --------------------------------------------------------------------------


def _from_environ(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    layer = {}
    known = {option.env: option for option in options()}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in RESERVED_ENV:
            continue
        option = known.get(variable)
        if option is None:
            raise ConfigError(f"unknown environment variable {variable}"
                              f"{_did_you_mean(variable, known, quote=False)}")
        where = f"environment variable {variable}"
        layer[option.name] = (option.accept(environ[variable], option.kind.from_text, where), f"env {variable}")
    return layer


# -- config files -----------------------------------------------------------------------------


def _from_file(path: str | None, cwd: str) -> dict[str, tuple[Any, str]]:
    """The settings of ``-c PATH``, else of ``[tool.prefork]`` in cwd/pyproject.toml, if any."""
    if path is None:
        candidate = Path(cwd, "pyproject.toml")
        if not candidate.is_file():
            return {}
        return _from_table(candidate, _tool_table(candidate, _read_toml(candidate)))
    full = Path(cwd, path)
    data = _read_toml(full)
    return _from_table(full, _tool_table(full, data) if full.name == "pyproject.toml" else data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}: not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path}: is a directory, not a TOML file") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc


def _tool_table(path: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    table = data.get("tool", {}).get("prefork") if isinstance(data.get("tool"), dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [tool.prefork] must be a table of settings")
    return table


def _from_table(path: Path, table: Mapping[str, Any] | None) -> dict[str, tuple[Any, str]]:
    if table is None:
        return {}
    label = f"file {path}" + (" [tool.prefork]" if path.name == "pyproject.toml" else "")
    layer = {}
    for key, raw in table.items():
        option = _by_name().get(key)
        if option is None:
            raise ConfigError(f"config file {path}: unknown setting {key!r}{_did_you_mean(key, _by_name())}")
        layer[key] = (option.accept(raw, option.kind.from_toml, f"in {path}"), label)
    return layer


# -- all sources together -----------------------------------------------------------------------


def load(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None,
         cwd: str | os.PathLike[str] | None = None) -> tuple[Settings, dict[str, str]]:
    """Settings from defaults < config file < environment < *argv* (setting flags and ``-c``).

    Returns the settings and, for every setting, where its value came from: ``default``,
    ``file PATH``, ``env NAME`` or ``command line``. Raises ConfigError.
    """
    environ = os.environ if environ is None else environ
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    from_argv, config_file = _from_argv(argv)
    values: dict[str, Any] = {}
    sources = {option.name: "default" for option in options()}
    for layer in (_from_file(config_file, cwd), _from_environ(environ), from_argv):
        for name, (value, source) in layer.items():
            values[name], sources[name] = value, source
    return Settings(**values), sources
