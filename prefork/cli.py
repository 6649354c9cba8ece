"""The ``prefork`` command: run a service; inspect and control a running master. Runs in: master.

Rules:

1. ``main(argv) -> int`` returns the exit code of the README's table. A user's mistake is one
   line on stderr (``prefork: error: ...``) naming the setting, option, path or address, never a
   traceback: every such mistake is a ``PreforkError`` and carries its exit code.
2. ``run`` never imports the app in the master (unless ``preload``): a reload must load new
   code. To find a service's ``DEFAULT_BIND`` it reads the module's source, not the module.
3. The control commands and ``status`` live in prefork.control.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from prefork import __version__, config, control, runpaths, settings_docs, top
from prefork import log as log_files
from prefork.master import serve
from prefork.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, AppLoadError, ConfigError, PreforkError
from prefork.handover import socket_activated

__all__ = ["main", "split_run_args", "RunArgs"]

log = logging.getLogger("prefork.cli")

# What a master started by socket activation serves when no bind is given: every socket systemd
# passed (as gunicorn does), not the service's default address beside them.
SOCKET_ACTIVATION_BIND = "systemd"
# The bundled service that serves a WSGI callable given with --wsgi.
WSGI_BRIDGE = "workers.wsgi"
# A service option this close to a setting's flag is taken for a misspelt flag (difflib ratio;
# "--max-request" vs "--max-requests" is 0.96, while the service option "--root" is 0.62 from
# "--group", which difflib's default cutoff of 0.6 would take for a typo).
TYPO_CUTOFF = 0.8

_COMMANDS = ("run", "status", "top", "reload", "stop", "upgrade", "scale", "reopen-logs", "check-config",
             "print-config")
_DEVELOPER_COMMANDS = ("generate",)  # not listed in --help
_APP_TEXT = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?")
_APP_HELP = ("APP is module:HandlerClass, a module with StreamHandler/DatagramHandler such as the "
             "bundled workers.echo or workers.http, or with --wsgi module:wsgi_callable")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default: ``sys.argv[1:]``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except PreforkError as exc:
        _error(str(exc))
        return exc.exit_code
    except SystemExit as exc:  # argparse: --help, --version and usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`prefork status | head`): not an error worth a traceback. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _dispatch(args: list[str]) -> int:
    command = args[0] if args else ""
    settings_command = _SETTINGS_COMMANDS.get(command)
    if settings_command is not None:
        return settings_command(args[1:])
    if command and not command.startswith("-") and command not in _COMMANDS + _DEVELOPER_COMMANDS:
        close = difflib.get_close_matches(command, _COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the commands are: {', '.join(_COMMANDS)}"
        raise ConfigError(f"unknown command {command!r}{hint}")
    parser = _parser()
    parsed = parser.parse_args(args)
    if parsed.command is None:
        parser.print_usage(sys.stderr)
        _error(f"a command is required: {', '.join(_COMMANDS)} (see prefork --help)")
        return EXIT_USAGE
    return int(parsed.func(parsed))


def _error(message: str) -> None:
    print(f"prefork: error: {message}", file=sys.stderr, flush=True)


# -- prefork run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class RunArgs:
    """``prefork run``'s command line, split: setting flags, APP, and the service's own options."""

    settings_argv: list[str] = dataclasses.field(default_factory=list)
    app: str | None = None
    service_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    help: bool = False


def split_run_args(tokens: Sequence[str]) -> RunArgs:
    """Split ``run``'s arguments: before APP only setting flags; after it, the setting flags
    still, and any other ``--name value`` is a service option (all of them after ``--``)."""
    flags = config.value_flags()
    args, rest = RunArgs(), list(tokens)
    while rest:
        token = rest.pop(0)
        if token == "--":
            _take_service_options(rest, args)
            break
        if token in ("-h", "--help"):
            args.help = True
        elif (flag := _flag_of(token, flags)) is not None:
            _take_setting(token, flag, rest, args, flags)
        elif token.startswith("-") and token != "-":
            if args.app is None:
                raise config.unknown_option([token])
            _take_service_option(token, rest, args, checked=True)
        elif args.app is None:
            args.app = token
        else:
            raise ConfigError(f"unexpected argument {token!r} after APP {args.app!r}; service options "
                              f"are written --NAME VALUE")
    return args


def _flag_of(token: str, flags: dict[str, bool]) -> str | None:
    """The setting flag *token* starts with: ``--workers``, ``--workers=4``, ``-w``, ``-w4``."""
    flag = token.partition("=")[0] if token.startswith("--") else token[:2]
    return flag if flag in flags and flag not in ("-h", "--help") else None


def _take_setting(token: str, flag: str, rest: list[str], args: RunArgs, flags: dict[str, bool]) -> None:
    args.settings_argv.append(token)
    if flags[flag] and token == flag:  # the value is the next argument
        if not rest:
            raise ConfigError(f"option {flag} expects a value (see prefork run --help)")
        args.settings_argv.append(rest.pop(0))


def _take_service_options(rest: list[str], args: RunArgs) -> None:
    while rest:
        token = rest.pop(0)
        if args.app is None and not token.startswith("-"):
            args.app = token
        else:
            _take_service_option(token, rest, args, checked=False)


def _take_service_option(token: str, rest: list[str], args: RunArgs, checked: bool) -> None:
    """``--name value``, ``--name=value`` or a lone ``--name`` (True) for the service's configure()."""
    name, eq, text = token[2:].partition("=")
    key = name.replace("-", "_")
    if not token.startswith("--") or not key.isidentifier():
        raise ConfigError(f"unknown option {token!r}: service options are written --NAME VALUE")
    if checked:
        close = difflib.get_close_matches(f"--{name}", list(config.value_flags()), n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise ConfigError(f"unknown option '--{name}'; did you mean {close[0]!r}? (an option of the "
                              f"service goes after '--': prefork run APP -- --{name} VALUE)")
    value: str | bool = text
    if not eq:
        value = rest.pop(0) if rest and not rest[0].startswith("--") else True
    args.service_options[key] = value


def _cmd_run(tokens: list[str]) -> int:
    args = split_run_args(tokens)
    if args.help:
        _run_parser().print_help()
        return EXIT_OK
    if args.app is None:
        raise ConfigError(f"prefork run: APP is missing; {_APP_HELP}")
    _check_app_text(args.app)
    environ, cwd = dict(os.environ), os.getcwd()
    settings, sources = config.load(args.settings_argv, environ, cwd)
    target, service_options = _service(args, settings)
    _add_import_path(cwd)
    activated = socket_activated(environ)
    default_bind = [SOCKET_ACTIVATION_BIND] if activated else _default_bind(target)
    if settings.wsgi:
        _find_module(args.app)  # the WSGI app's module must exist too: report it now, exit 3

    pidfile = settings.pidfile or runpaths.default_pidfile(settings.name or runpaths.service_name(target))

    def reload_settings() -> config.Settings:
        """Called in the master on HUP: the same sources, read again."""
        fresh, fresh_sources = config.load(args.settings_argv, environ, cwd)
        return _with_defaults(fresh, fresh_sources, default_bind, pidfile)

    settings = _with_defaults(settings, sources, default_bind, pidfile)
    log_files.setup(settings)
    if activated and sources["bind"] == "default":
        log.info("socket activation: serving the %d socket(s) systemd passed (LISTEN_FDS), as no bind "
                 "was given", activated)
    return serve(target, settings=settings, reload_settings=reload_settings, service_options=service_options)


def _check_app_text(app: str) -> None:
    if not _APP_TEXT.fullmatch(app):
        raise ConfigError(f"APP {app!r} is not a module or module:attribute; {_APP_HELP}")


def _service(args: RunArgs, settings: config.Settings) -> tuple[str, dict[str, Any]]:
    """The app target given to serve() and its service options (--wsgi: the bundled bridge)."""
    assert args.app is not None
    if not settings.wsgi:
        return args.app, args.service_options
    if "app" in args.service_options:
        raise ConfigError("the service option --app cannot be combined with --wsgi: APP is the WSGI callable")
    return WSGI_BRIDGE, {"app": args.app, **args.service_options}


def _add_import_path(cwd: str) -> None:
    """Apps are imported from the current directory, as `python -m` would (gunicorn does too)."""
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def _with_defaults(settings: config.Settings, sources: dict[str, str], bind: list[str],
                   pidfile: str) -> config.Settings:
    """The service's default bind, and the default pidfile chosen at start (runpaths), unless set."""
    if sources["bind"] == "default":
        settings = dataclasses.replace(settings, bind=list(bind))
    return settings if settings.pidfile else dataclasses.replace(settings, pidfile=pidfile)


def _default_bind(target: str) -> list[str]:
    """A literal ``DEFAULT_BIND`` of the app's module, read from its source; else the fallback."""
    origin = _find_module(target)
    literal = _literal_assignment(origin, "DEFAULT_BIND") if origin else None
    if isinstance(literal, str):
        literal = [literal]
    if isinstance(literal, (list, tuple)) and literal and all(isinstance(s, str) for s in literal):
        return list(literal)
    return [config.FALLBACK_BIND]


def _find_module(target: str) -> str | None:
    """The source file of *target*'s module (None if it has none); AppLoadError if there is no module."""
    module = target.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:  # a parent package is missing
        raise AppLoadError(f"cannot load {target!r}: no module named {exc.name!r}") from exc
    except Exception as exc:  # find_spec imports the parent packages: any error of theirs is the app's
        raise AppLoadError(f"cannot load {target!r}: importing the package of {module!r} failed: {exc!r}") from exc
    if spec is None:
        raise AppLoadError(f"cannot load {target!r}: no module named {module!r}")
    return spec.origin if spec.origin and spec.origin.endswith(".py") else None


def _literal_assignment(path: str, name: str) -> Any:
    """The literal value assigned to *name* at the top of the module at *path*, or None."""
    try:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None  # the worker will import it and report what is wrong
    for node in tree.body:
        value = _assigned_value(node, name)
        if value is not None:
            try:
                return ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None  # computed, not a literal (or one literal_eval cannot build): the fallback applies
    return None


def _assigned_value(node: ast.stmt, name: str) -> ast.expr | None:
    """The expression of ``name = ...`` or ``name: T = ...``; None for any other statement."""
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
        return node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
        return node.value
    return None


# -- prefork check-config, print-config ---------------------------------------------------------


def _cmd_check_config(tokens: list[str]) -> int:
    if _wants_help(tokens):
        _settings_parser("check-config").print_help()
        return EXIT_OK
    config.load(tokens)
    print("configuration OK")
    return EXIT_OK


def _cmd_print_config(tokens: list[str]) -> int:
    if _wants_help(tokens):
        _settings_parser("print-config").print_help()
        return EXIT_OK
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--json", action="store_true")
    known, rest = pre.parse_known_args(tokens)
    settings, sources = config.load(rest)
    values = {name: getattr(settings, name) for name in sources}
    if known.json:
        print(json.dumps({name: {"value": _jsonable(name, value), "source": sources[name]}
                          for name, value in values.items()}, indent=2))
        return EXIT_OK
    rows = [(name, config.format_value(name, value), _source_text(name, sources[name]))
            for name, value in values.items()]
    print(control.columns([("SETTING", "VALUE", "SOURCE"), *rows]))
    return EXIT_OK


def _source_text(name: str, source: str) -> str:
    """The source, and for a default decided at run time (bind, workers, name) what decides it."""
    described = next(option.default_text for option in config.options() if option.name == name)
    return f"default: {described}" if source == "default" and described else source


def _wants_help(tokens: list[str]) -> bool:
    return "-h" in tokens or "--help" in tokens


def _jsonable(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, list)):
        return value
    return config.format_value(name, value)


# -- prefork generate (for developers) -----------------------------------------------------------


def _cmd_generate(args: argparse.Namespace) -> int:
    stale = settings_docs.write_generated(args.root, check=args.check)
    if args.check and stale:
        _error("stale, run `prefork generate`: " + ", ".join(map(str, stale)))
        return EXIT_FAILURE
    for path in stale:
        print(f"wrote {path}")
    return EXIT_OK


# -- parsers -------------------------------------------------------------------------------------


_SETTINGS_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _cmd_run,
    "check-config": _cmd_check_config,
    "print-config": _cmd_print_config,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefork", allow_abbrev=False,
                                     description="A pre-forking server runtime. Exit codes: 0 ok, 1 failure, "
                                                 "2 usage or configuration error, 3 the app could not be "
                                                 "loaded, 4 a listener could not be bound, 5 unhealthy "
                                                 "(status), 6 not all of the reload applied (reload).")
    parser.add_argument("--version", action="version", version=f"prefork {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run a service: prefork run APP [options] (see prefork run --help)",
                        add_help=False)
    _control_commands(commands)
    commands.add_parser("check-config", help="check the configuration; exit 2 with the message if wrong",
                        add_help=False)
    commands.add_parser("print-config", help="every setting, its effective value and where it came from",
                        add_help=False)
    generate = commands.add_parser("generate", allow_abbrev=False)  # for developers: not listed
    generate.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    generate.add_argument("--root", default=".", help="the source tree (default: .)")
    generate.set_defaults(func=_cmd_generate)
    return parser


def _control_commands(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-p", "--pidfile", metavar="FILE",
                        help="the master's pidfile (default: the pidfile setting of -c FILE, "
                             "[tool.prefork] in ./pyproject.toml or PREFORK_PIDFILE; else the one "
                             "master running with a default pidfile)")
    common.add_argument("-n", "--name", metavar="NAME",
                        help="without a pidfile: the master of this service, when several are running")
    common.add_argument("-c", "--config", metavar="FILE", help="config file to read the pidfile setting from")
    waiting = argparse.ArgumentParser(add_help=False, parents=[common])
    waiting.add_argument("--timeout", type=float, default=control.DEFAULT_WAIT, metavar="SECONDS",
                         help=f"give up waiting after this long (default: {control.DEFAULT_WAIT:g}; exit 1)")
    specs: list[tuple[str, str, Callable[[argparse.Namespace], int], argparse.ArgumentParser]] = [
        ("status", "the master, its health and one row per worker; exit 5 when the pool is unhealthy",
         control.cmd_status, common),
        ("top", "a live view of the master and its workers, refreshed every second (q quits; on a pipe, "
                "plain text per second)", top.cmd_top, common),
        ("reload", "HUP: reload the configuration and code; waits until every worker is of the new "
                   "generation, prints what changed; exit 6 if a setting needs a new master",
         control.cmd_reload, waiting),
        ("stop", "TERM (graceful) or QUIT (--fast); waits until the master has exited", control.cmd_stop, waiting),
        ("upgrade", "USR2: a new master on the same sockets; waits until its workers accept",
         control.cmd_upgrade, waiting),
        ("scale", "TTIN/TTOU one at a time until the pool has N workers (N, +N or -N)", control.cmd_scale, waiting),
        ("reopen-logs", "USR1: the master and the workers reopen their log files", control.cmd_reopen_logs, waiting),
    ]
    for name, help_text, func, parent in specs:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[parent],
                                  allow_abbrev=False)
        sub.set_defaults(func=func)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
            sub.add_argument("--grace", type=float, default=control.DEFAULT_GRACE, metavar="SECONDS",
                             help="how long the pool may have fewer serving workers than its target "
                                  f"before it is unhealthy (default: {control.DEFAULT_GRACE:g})")
        elif name == "top":
            sub.add_argument("-i", "--iterations", type=int, default=0, metavar="N",
                             help="print N frames as plain text, one a second, then exit (default: run "
                                  "until q, or until interrupted when stdout is not a terminal)")
            sub.add_argument("--sort", choices=sorted(top.SORT_KEYS), default="n",
                             help="the first sort key: n number, r requests/s, a request age, c CPU, m RSS")
        elif name == "stop":
            sub.add_argument("--fast", action="store_true", help="fast stop (QUIT): in-flight requests are cut")
        elif name == "scale":
            sub.add_argument("count", metavar="N|+N|-N", help="the number of workers, or a change to it")


def _run_parser() -> argparse.ArgumentParser:
    parser = config.argument_parser(
        prog="prefork run", usage="prefork run [options] APP [--SERVICE-OPTION VALUE ...]",
        description=f"Run a service until it is stopped. {_APP_HELP}. Every setting has a flag; "
                    f"options after APP that are not settings (such as --root DIR for workers.http) "
                    f"are passed to the service; after '--' all of them are.")
    parser.add_argument("app", metavar="APP", help=_APP_HELP)
    return parser


def _settings_parser(command: str) -> argparse.ArgumentParser:
    descriptions = {"check-config": "Check the configuration (defaults, config file, PREFORK_* environment, "
                                    "flags): prints 'configuration OK', or the error and exits 2.",
                    "print-config": "Print every setting, its effective value and where it came from."}
    parser = config.argument_parser(prog=f"prefork {command}", description=descriptions[command])
    if command == "print-config":
        parser.add_argument("--json", action="store_true", help="print JSON: {setting: {value, source}}")
    return parser
