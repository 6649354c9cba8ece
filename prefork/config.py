"""The one declaration of every setting. Runs in: master.

Rule: a setting exists once, here, as a field of ``Settings`` with its type, default, validator
and help. The command line, the ``PREFORK_*`` environment variables, the TOML keys, the README's
settings table and ``deploy/prefork.toml`` are all derived from these fields; nothing else
declares a setting. Nothing is read from the environment at import time.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Callable, Mapping

from prefork.errors import ConfigError

__all__ = ["Settings", "settings_fields", "make_settings"]

_Validator = Callable[[str, Any], Any]


def _setting(default: Any, help: str, validate: _Validator | None = None, *, factory: bool = False,
             section: str = "workers") -> Any:
    metadata = {"help": help, "validate": validate, "section": section}
    if factory:
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _at_least(minimum: float) -> _Validator:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected a number >= {minimum}")
        return value
    return check


def _integer(minimum: int) -> _Validator:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected an integer >= {minimum}")
        return value
    return check


def _one_of(*choices: str) -> _Validator:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            allowed = ", ".join(choices)
            raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected one of: {allowed}")
        return value
    return check


def _boolean(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected true or false")
    return value


def _optional_text(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, (str, int)):
        raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected a name, a number or nothing")
    return value


def _hook(name: str, value: Any) -> Any:
    if value is not None and not callable(value) and not (isinstance(value, str) and ":" in value):
        raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected a callable or 'module:function'")
    return value


def _bind_list(name: str, value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"setting {name!r}: {value!r} is not allowed; expected a list of bind specs")
    return list(value)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass
class Settings:
    """Every setting of a prefork service; validated on construction."""

    # -- listeners
    bind: list[str] = _setting(list, "listeners: tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, "
                               "unix-dgram:PATH, fd://N, systemd[:NAME]", _bind_list, factory=True,
                               section="listeners")
    backlog: int = _setting(0, "listen backlog; 0 means as large as the OS allows (somaxconn)",
                            _integer(0), section="listeners")
    reuse_port: bool = _setting(False, "each worker binds its own SO_REUSEPORT socket (kernel balancing; "
                                "a stopping worker's queued connections are lost)", _boolean,
                                section="listeners")
    unix_mode: int | None = _setting(None, "file mode of Unix socket files, e.g. 0o660", None,
                                     section="listeners")
    unix_owner: str | int | None = _setting(None, "owner of Unix socket files", _optional_text,
                                            section="listeners")
    unix_group: str | int | None = _setting(None, "group of Unix socket files", _optional_text,
                                            section="listeners")
    # -- pool
    workers: int = _setting(_cpu_count, "number of worker processes (default: the usable CPUs)",
                            _integer(0), factory=True)
    mode: str = _setting("sync", "what runs inside each worker: sync (one request at a time), "
                         "thread (a thread per request, at most `threads`), fork (a process per request)",
                         _one_of("sync", "thread", "fork"))
    threads: int = _setting(16, "most concurrent request threads per worker in thread mode", _integer(1))
    max_workers: int = _setting(0, "adaptive pool: upper bound; 0 keeps the pool at `workers`", _integer(0))
    min_workers: int = _setting(1, "adaptive pool: lower bound", _integer(1))
    min_spare: int = _setting(1, "adaptive pool: start workers while fewer than this are idle", _integer(0))
    max_spare: int = _setting(4, "adaptive pool: stop workers while more than this are idle", _integer(1))
    # -- supervision
    timeout: float = _setting(30.0, "seconds a worker may spend on one request before it is killed "
                              "(its traceback logged first); 0 disables", _at_least(0))
    graceful_timeout: float = _setting(30.0, "seconds a stopping worker gets to finish before SIGKILL",
                                       _at_least(0))
    max_requests: int = _setting(0, "recycle a worker after this many requests; 0 disables", _integer(0))
    max_requests_jitter: int = _setting(0, "add up to this many requests at random to max_requests, "
                                        "so workers do not recycle together", _integer(0))
    max_worker_memory: int = _setting(0, "recycle a worker whose RSS exceeds this many bytes; 0 disables",
                                      _integer(0))
    max_worker_lifetime: float = _setting(0.0, "recycle a worker after this many seconds; 0 disables",
                                          _at_least(0))
    preload: bool = _setting(False, "import the app in the master and gc.freeze() before forking", _boolean)
    # -- process
    name: str = _setting("", "service name shown in process titles (default: the app's name)",
                         section="process")
    pidfile: str | None = _setting(None, "write the master's pid here (atomically); removed on stop",
                                   _optional_text, section="process")
    user: str | int | None = _setting(None, "run workers as this user (the master binds first)",
                                      _optional_text, section="process")
    group: str | int | None = _setting(None, "run workers as this group", _optional_text, section="process")
    umask: int | None = _setting(None, "umask of master and workers, e.g. 0o027", None, section="process")
    # -- hooks
    on_starting: Any = _setting(None, "called in the master before the listeners are bound", _hook,
                                section="hooks")
    when_ready: Any = _setting(None, "called in the master once every worker accepts", _hook, section="hooks")
    pre_fork: Any = _setting(None, "called in the master before each worker is forked", _hook, section="hooks")
    post_fork: Any = _setting(None, "called in each worker right after fork", _hook, section="hooks")
    worker_exit: Any = _setting(None, "called in the master when a worker has exited", _hook, section="hooks")
    on_exit: Any = _setting(None, "called in the master just before it exits", _hook, section="hooks")

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


def settings_fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def make_settings(values: Mapping[str, Any]) -> Settings:
    """Settings from a mapping; an unknown key is a ConfigError that suggests the closest name."""
    known = {f.name for f in settings_fields()}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r}{hint}")
    return Settings(**values)
