"""The exceptions prefork raises, and the master's exit codes. Runs in: both.

::

    PreforkError                 a failure prefork reports to its user (exit_code 1)
    ├── ConfigError              a wrong setting or usage (exit_code 2)
    │   └── BindSpecError        a bind spec that cannot be parsed
    ├── AppLoadError             the application could not be imported or found (exit_code 3)
    ├── ListenerError            a listener could not be bound (exit_code 4)
    └── PidfileError            a pidfile is owned by a live master, or cannot be written
    HaltServer (BaseException)   raised inside the master's loop to stop it with an exit code;
                                 a BaseException so that application code cannot catch it by accident

Every message names what was wrong (the setting, the address, the path), the value given and,
where it helps, what is allowed: these are shown to the user as they are, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_APP_LOAD",
    "EXIT_BIND",
    "EXIT_UNHEALTHY",
    "EXIT_NOT_APPLIED",
    "PreforkError",
    "ConfigError",
    "BindSpecError",
    "AppLoadError",
    "ListenerError",
    "PidfileError",
    "HaltServer",
]

EXIT_OK = 0  # clean stop
EXIT_FAILURE = 1  # unexpected failure
EXIT_USAGE = 2  # usage or configuration error
EXIT_APP_LOAD = 3  # a worker (or the master, with preload) could not load the app
EXIT_BIND = 4  # a listener could not be bound
EXIT_UNHEALTHY = 5  # `prefork status`: the pool does not serve as promised (the reasons are printed)
EXIT_NOT_APPLIED = 6  # `prefork reload`: done, but settings that need a new master were not applied


class PreforkError(Exception):
    """A failure reported to the user as a message, without a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, *args: object, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(PreforkError):
    """A setting or command-line usage is wrong."""

    exit_code = EXIT_USAGE


class BindSpecError(ConfigError):
    """A bind spec such as ``tcp://127.0.0.1:9000`` cannot be parsed."""


class AppLoadError(PreforkError):
    """The application (handler, server class or WSGI callable) could not be loaded."""

    exit_code = EXIT_APP_LOAD


class ListenerError(PreforkError):
    """A listener could not be bound; the message names the address and the reason."""

    exit_code = EXIT_BIND

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


class PidfileError(PreforkError):
    """The pidfile belongs to a live master, or cannot be written or read."""


class HaltServer(BaseException):
    """Stop the master's loop now and exit with *exit_code* after *reason* is logged."""

    def __init__(self, reason: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code
