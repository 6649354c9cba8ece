"""The ``prefork`` command: run a service; inspect and control a running master. Runs in: master.

Rules:

1. ``main(argv) -> int`` returns the exit code of the README's table. A user's mistake is one
   line on stderr (``prefork: error: ...``) naming the setting, option, path or address, never a
   traceback: every such mistake is a ``PreforkError`` and carries its exit code.
2. ``run`` never imports the app in the master (unless ``preload``): a reload must load new
   code. To find a service's ``DEFAULT_BIND`` it reads the module's source, not the module.
3. The control commands find the master by its pidfile, send one signal at a time and wait,
   with a deadline, until the pidfile and the scoreboard (``PIDFILE.scoreboard``) show that it
   took effect: two signals of one kind sent together would merge into one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Sequence

import psutil

from prefork import __version__, config, settings_docs
from prefork.arbiter import SCOREBOARD_CAPACITY
from prefork.master import serve
from prefork.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, AppLoadError, ConfigError, PidfileError, PreforkError
from prefork.pidfile import is_running, read_pid
from prefork.procstats import CpuSampler, ProcStats, stats
from prefork.scoreboard import BUSY, IDLE, MasterView, Scoreboard, SlotView

__all__ = ["main", "split_run_args", "RunArgs"]

# How long a control command waits for its effect unless --timeout says otherwise: more than
# the default graceful_timeout (30 s), so that `prefork stop` sees a graceful stop through.
DEFAULT_WAIT = 60.0
# A master publishes its pool's figures on its first turn, a moment after it starts; a command
# that reads them waits this long at most.
PUBLISH_WAIT = 5.0
# How often a waiting control command reads the pidfile and the scoreboard.
POLL_INTERVAL = 0.05
# `prefork status` measures CPU % between two readings of each process this far apart.
CPU_SAMPLE_INTERVAL = 0.1
# The error log's format when prefork.log does not set logging up.
FALLBACK_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
# The bundled service that serves a WSGI callable given with --wsgi.
WSGI_BRIDGE = "workers.wsgi"
# A service option this close to a setting's flag is taken for a misspelt flag (difflib ratio;
# "--max-request" vs "--max-requests" is 0.96, while the service option "--root" is 0.62 from
# "--group", which difflib's default cutoff of 0.6 would take for a typo).
TYPO_CUTOFF = 0.8
# The most workers one master runs: its scoreboard's slots.
MAX_WORKERS = SCOREBOARD_CAPACITY

_COMMANDS = ("run", "status", "reload", "stop", "upgrade", "scale", "reopen-logs", "check-config",
             "print-config")
_DEVELOPER_COMMANDS = ("generate",)  # not listed in --help
_READY = (IDLE, BUSY)
_APP_TEXT = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?")
_SCALE_TEXT = re.compile(r"([+-]?)([0-9]{1,6})")
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
    default_bind = _default_bind(target)
    if settings.wsgi:
        _find_module(args.app)  # the WSGI app's module must exist too: report it now, exit 3

    def reload_settings() -> config.Settings:
        """Called in the master on HUP: the same sources, read again."""
        fresh, fresh_sources = config.load(args.settings_argv, environ, cwd)
        return _with_default_bind(fresh, fresh_sources, default_bind)

    settings = _with_default_bind(settings, sources, default_bind)
    _setup_logging(settings)
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


def _with_default_bind(settings: config.Settings, sources: dict[str, str], bind: list[str]) -> config.Settings:
    if sources["bind"] != "default":
        return settings
    return dataclasses.replace(settings, bind=list(bind))


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


def _setup_logging(settings: config.Settings) -> None:
    """prefork.log.setup(settings) if that module offers it, else a plain error log."""
    try:
        setup = getattr(importlib.import_module("prefork.log"), "setup", None)
    except ModuleNotFoundError as exc:
        if exc.name != "prefork.log":
            raise
        setup = None
    if setup is not None:
        setup(settings)
        return
    try:
        destination: dict[str, Any] = {"stream": sys.stderr} if settings.error_log == "-" else {
            "filename": settings.error_log}
        logging.basicConfig(level=settings.loglevel.upper(), format=FALLBACK_LOG_FORMAT, **destination)
    except OSError as exc:
        raise ConfigError(f"setting 'error_log': cannot open {settings.error_log!r}: {exc.strerror}") from exc


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
    print(_columns([("SETTING", "VALUE", "SOURCE"), *rows]))
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


# -- finding and watching the master -------------------------------------------------------------


@dataclasses.dataclass
class _Master:
    """The running master named by a pidfile."""

    pidfile: str
    pid: int

    @classmethod
    def find(cls, args: argparse.Namespace) -> _Master:
        pidfile = os.path.abspath(_pidfile(args))
        return cls(pidfile, read_pid(pidfile))

    @property
    def scoreboard(self) -> str:
        return f"{self.pidfile}.scoreboard"

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError as exc:
            raise PidfileError(f"no master running: pidfile {self.pidfile} names pid {self.pid}, "
                               f"which has exited") from exc
        except PermissionError as exc:
            raise PreforkError(f"cannot signal master {self.pid} (pidfile {self.pidfile}): permission "
                               f"denied; run the command as the master's user") from exc

    def snapshot(self, doing: str = "") -> tuple[MasterView, list[SlotView]]:
        """The scoreboard's header and used slots; PreforkError if the master has gone."""
        if doing and not is_running(self.pid):
            raise PreforkError(f"master {self.pid} exited while {doing}; see its error log")
        try:
            board = Scoreboard.open(self.scoreboard)
        except FileNotFoundError as exc:
            raise PreforkError(f"no scoreboard at {self.scoreboard}: is pid {self.pid} (from {self.pidfile}) "
                               f"a prefork master?") from exc
        except ValueError as exc:  # not a scoreboard, or an empty file
            raise PreforkError(f"cannot read the scoreboard {self.scoreboard}: {exc}") from exc
        try:
            return board.master(), board.used()
        finally:
            board.close()

    def published(self, timeout: float = PUBLISH_WAIT) -> tuple[MasterView, list[SlotView]]:
        """A snapshot once the master has published its pool's figures (generation 1 or more).

        The header is written on each turn of the master's loop, so for a moment after the
        start it still reads generation 0 and target 0, while workers already fill slots.
        """
        _wait(f"master {self.pid} publishing its pool in {self.scoreboard}",
              lambda: self.snapshot("starting")[0].generation > 0, timeout)
        return self.snapshot()


def _pidfile(args: argparse.Namespace) -> str:
    """--pidfile, else the pidfile setting from the config file and the environment."""
    if args.pidfile:
        return str(args.pidfile)
    settings, _ = config.load(["-c", args.config] if args.config else [])
    if settings.pidfile:
        return str(settings.pidfile)
    raise ConfigError("no pidfile to find the master by: give --pidfile FILE, or set pidfile in the config "
                      "file (-c FILE, or [tool.prefork] in ./pyproject.toml) or in PREFORK_PIDFILE")


def _settled(view: MasterView, slots: list[SlotView], generation: int | None = None) -> bool:
    """True when the pool has its target size, every worker accepting (and of *generation*)."""
    return len(slots) == view.target and all(
        slot.pid and slot.state in _READY and (generation is None or slot.generation == generation)
        for slot in slots)


def _wait(what: str, done: Callable[[], bool], timeout: float, hint: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise PreforkError(f"{what}: not complete after {timeout:g} s{hint}")
        time.sleep(POLL_INTERVAL)


# -- prefork reload, stop, upgrade, scale, reopen-logs --------------------------------------------


def _cmd_reload(args: argparse.Namespace) -> int:
    master = _Master.find(args)
    watch = _ReloadWatch(master, master.published()[0])
    master.signal(signal.SIGHUP)
    _wait(f"reload of master {master.pid}", watch.done, args.timeout,
          "; the new workers are not all accepting yet, see the master's error log")
    print(f"reloaded: master {master.pid} runs {_workers(watch.workers)} of generation {watch.generation}")
    return EXIT_OK


class _ReloadWatch:
    """Follows a reload: the scoreboard's generation goes up, then every worker is of it.

    The master publishes how reloads ended: a refused one (the new configuration is wrong) and a
    failed one (the new workers could not load the app; the old ones keep serving) each raise a
    counter in the scoreboard's header, which this compares with its reading before the HUP.
    """

    def __init__(self, master: _Master, before: MasterView) -> None:
        self.master = master
        self.before = before
        self.generation = before.generation
        self.workers = 0

    def done(self) -> bool:
        view, slots = self.master.snapshot("reloading")
        if view.reloads_refused > self.before.reloads_refused:
            raise ConfigError(f"master {self.master.pid} refused the reload: its new configuration is "
                              f"wrong; see its error log")
        if view.reloads_failed > self.before.reloads_failed:
            raise AppLoadError(f"master {self.master.pid} cancelled the reload: the workers of generation "
                               f"{view.generation} could not load the app, the old ones keep serving; "
                               f"see its error log")
        if view.generation == self.before.generation:
            return False
        self.generation, self.workers = view.generation, len(slots)
        return _settled(view, slots, view.generation)


def _cmd_stop(args: argparse.Namespace) -> int:
    master = _Master.find(args)
    master.signal(signal.SIGQUIT if args.fast else signal.SIGTERM)
    _wait(f"{'fast' if args.fast else 'graceful'} stop of master {master.pid}",
          lambda: not is_running(master.pid), args.timeout)
    print(f"stopped: master {master.pid}")
    return EXIT_OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    master = _Master.find(args)
    watch = _UpgradeWatch(master)
    master.signal(signal.SIGUSR2)
    _wait(f"upgrade of master {master.pid}", watch.done, args.timeout,
          "; see the error log of both masters")
    print(f"upgraded: master {watch.new_pid} runs {watch.workers} workers; master {master.pid} is "
          f"stopping gracefully")
    return EXIT_OK


class _UpgradeWatch:
    """Follows an upgrade: the pidfile moves to PIDFILE.oldbin, then names the new master."""

    def __init__(self, old: _Master) -> None:
        self.old = old
        self.oldbin = f"{old.pidfile}.oldbin"
        self.handed_over = False  # the old master has moved its pidfile aside
        self.new_pid = 0
        self.workers = 0

    def done(self) -> bool:
        pid = _live_pid(self.old.pidfile)
        if pid != self.old.pid or os.path.exists(self.oldbin):
            self.handed_over = True
        if pid is None or pid == self.old.pid:
            self._check_failed(pid)
            return False
        return self._new_master_ready(_Master(self.old.pidfile, pid))

    def _check_failed(self, pid: int | None) -> None:
        if self.handed_over and pid == self.old.pid and not os.path.exists(self.oldbin):
            raise PreforkError(f"upgrade failed: the new master exited and master {self.old.pid} keeps "
                               f"serving; see its error log")
        if pid is None and not is_running(self.old.pid):
            raise PreforkError(f"upgrade failed: master {self.old.pid} exited and no new master wrote "
                               f"{self.old.pidfile}; see the error log")

    def _new_master_ready(self, new: _Master) -> bool:
        try:
            view, slots = new.snapshot()
        except PreforkError:
            return False  # the new master has not written its scoreboard yet
        if view.pid != new.pid or view.target < 1 or not _settled(view, slots):
            return False
        self.new_pid, self.workers = new.pid, len(slots)
        return True


def _live_pid(pidfile: str) -> int | None:
    try:
        return read_pid(pidfile)
    except PidfileError:
        return None  # missing or stale for a moment while the masters hand over


def _cmd_scale(args: argparse.Namespace) -> int:
    change = _parse_scale(args.count)
    master = _Master.find(args)
    current = master.published()[0].target
    desired = _scale_target(args.count, change, current)
    deadline = time.monotonic() + args.timeout
    while current != desired:
        step = 1 if desired > current else -1
        master.signal(signal.SIGTTIN if step > 0 else signal.SIGTTOU)
        expected = current + step
        _wait(f"scaling master {master.pid} to {_workers(expected)}",
              lambda: master.snapshot("scaling")[0].target == expected, max(0.0, deadline - time.monotonic()))
        current = expected
    _wait(f"scaling master {master.pid} to {_workers(desired)}", lambda: _settled(*master.snapshot("scaling")),
          max(0.0, deadline - time.monotonic()))
    print(f"scaled: master {master.pid} runs {_workers(desired)}")
    return EXIT_OK


def _parse_scale(text: str) -> tuple[str, int]:
    """'3' -> ('', 3), '+2' -> ('+', 2), '-1' -> ('-', 1); ConfigError for anything else."""
    match = _SCALE_TEXT.fullmatch(text)
    if match is None:
        raise ConfigError(f"scale: {text!r} is not allowed; expected N, +N or -N (a number of workers)")
    return match.group(1), int(match.group(2))


def _scale_target(text: str, change: tuple[str, int], current: int) -> int:
    sign, number = change
    desired = current + number if sign == "+" else current - number if sign == "-" else number
    if not 1 <= desired <= MAX_WORKERS:
        raise ConfigError(f"scale: {text!r} would make {_workers(desired)} (now {current}); "
                          f"allowed: 1 to {MAX_WORKERS}")
    return desired


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def _cmd_reopen_logs(args: argparse.Namespace) -> int:
    master = _Master.find(args)
    master.signal(signal.SIGUSR1)
    # Nothing a reader can see records that files were reopened, so there is nothing to wait
    # for: the master reopens its own and passes USR1 on to every worker in its next turn.
    print(f"sent SIGUSR1: master {master.pid} and its workers reopen their log files")
    return EXIT_OK


# -- prefork status ------------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    master = _Master.find(args)
    report = _status_report(master)
    print(json.dumps(report, indent=2) if args.json else _format_status(report))
    return EXIT_OK


def _status_report(master: _Master) -> dict[str, Any]:
    view, slots = master.published()
    readings = _sample([master.pid, *(slot.pid for slot in slots if slot.pid)])
    now = time.monotonic()
    return {
        "pidfile": master.pidfile,
        "master": {"pid": master.pid, "title": _title(master.pid), "generation": view.generation,
                   "target": view.target, "workers": len(slots), "uptime": round(now - view.started, 3),
                   "restarts": view.restarts, **_usage(readings.get(master.pid))},
        "workers": [_worker_row(slot, readings.get(slot.pid), now) for slot in slots],
    }


def _sample(pids: list[int]) -> dict[int, ProcStats | None]:
    """Memory (RSS, USS) and CPU % of each process, the CPU over CPU_SAMPLE_INTERVAL."""
    sampler = CpuSampler()
    for pid in pids:
        stats(pid, sampler=sampler)
    time.sleep(CPU_SAMPLE_INTERVAL)  # a measuring interval, not a wait for something to happen
    return {pid: stats(pid, with_uss=True, sampler=sampler) for pid in pids}


def _worker_row(slot: SlotView, reading: ProcStats | None, now: float) -> dict[str, Any]:
    return {"pid": slot.pid, "number": slot.number, "generation": slot.generation, "state": slot.state_name,
            "requests": slot.requests, "request_age": round(slot.request_age(now), 3),
            "client": slot.client, "listener": slot.listener, "uptime": round(now - slot.started, 3),
            **_usage(reading)}


def _usage(reading: ProcStats | None) -> dict[str, Any]:
    if reading is None:
        return {"rss": None, "uss": None, "cpu_percent": None}
    cpu = None if reading.cpu_percent is None else round(reading.cpu_percent, 1)
    return {"rss": reading.rss, "uss": reading.uss, "cpu_percent": cpu}


def _title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()  # setproctitle pads with spaces
    except psutil.Error:
        return ""  # gone or not ours to read: the title is a nicety


def _format_status(report: dict[str, Any]) -> str:
    m = report["master"]
    restarts = ", ".join(f"{cause} {count}" for cause, count in m["restarts"].items())
    head = (f"master {m['pid']}  {m['title']}\n"
            f"  generation {m['generation']}, {m['workers']} of {m['target']} workers, up {_duration(m['uptime'])}, "
            f"RSS {_size(m['rss'])}, USS {_size(m['uss'])}, CPU {_percent(m['cpu_percent'])}\n"
            f"  restarts: {restarts}\n")
    rows = [("PID", "#", "GEN", "STATE", "REQUESTS", "REQ AGE", "RSS", "USS", "CPU", "UP")]
    for w in report["workers"]:
        age = _duration(w["request_age"]) if w["state"] == "busy" else "-"
        rows.append((str(w["pid"]), str(w["number"]), str(w["generation"]), w["state"], str(w["requests"]),
                     age, _size(w["rss"]), _size(w["uss"]), _percent(w["cpu_percent"]), _duration(w["uptime"])))
    return head + "\n" + _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return "-"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
                                                 "loaded, 4 a listener could not be bound.")
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
                             "[tool.prefork] in ./pyproject.toml or PREFORK_PIDFILE)")
    common.add_argument("-c", "--config", metavar="FILE", help="config file to read the pidfile setting from")
    waiting = argparse.ArgumentParser(add_help=False, parents=[common])
    waiting.add_argument("--timeout", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                         help=f"give up waiting after this long (default: {DEFAULT_WAIT:g}; exit 1)")
    specs: list[tuple[str, str, Callable[[argparse.Namespace], int], argparse.ArgumentParser]] = [
        ("status", "the master and one row per worker", _cmd_status, common),
        ("reload", "HUP: reload the configuration and code; waits until every worker is of the new "
                   "generation", _cmd_reload, waiting),
        ("stop", "TERM (graceful) or QUIT (--fast); waits until the master has exited", _cmd_stop, waiting),
        ("upgrade", "USR2: a new master on the same sockets; waits until its workers accept",
         _cmd_upgrade, waiting),
        ("scale", "TTIN/TTOU one at a time until the pool has N workers (N, +N or -N)", _cmd_scale, waiting),
        ("reopen-logs", "USR1: the master and the workers reopen their log files", _cmd_reopen_logs, waiting),
    ]
    for name, help_text, func, parent in specs:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[parent],
                                  allow_abbrev=False)
        sub.set_defaults(func=func)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
