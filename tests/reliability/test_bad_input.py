"""Bad input to `prefork run`, as a real subprocess: every mistake ends with the README's exit code
and one clear line, never a traceback.

README "Exit codes" and "Command line": a mistake on the command line, in the config file or in
the environment exits 2 with one line naming the setting (or the unknown name and the closest
valid one), the value given and what is allowed; an app that cannot be loaded exits 3; a listener
that cannot be bound exits 4, naming the address and the reason. Errors found before a master
starts are the only line on stderr (``prefork: error: ...``); those a master finds (a worker that
cannot load the app) are one log record among the master's, with no continuation lines.

tests/test_cli.py checks some of these in-process and tests/integration/test_cli.py a few against
real masters; this module holds the whole list, each as the user meets it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from prefork.errors import EXIT_APP_LOAD, EXIT_BIND, EXIT_USAGE
from tests.support import kill_process_group

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
# A bound on a hang: every case here ends within a second or two; a master that wrongly starts
# serving is stopped after this long and the test fails.
RUN_TIMEOUT = 60.0
# What may start a line of stderr: the CLI's one error line, or a record of the master's log
# (text format: "[2026-01-01 00:00:00 +0000] [pid] [LEVEL] logger: message").
STDERR_LINE = re.compile(r"prefork: error: |\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

# Files each case may name, written to its directory (the current directory of `prefork run`).
FILES = {
    "wrong_type.toml": 'workers = "two"\n',
    "switch_text.toml": 'preload = "yes"\n',
    "negative_user.toml": "user = -5\n",
    "unknown_key.toml": "wrkers = 2\n",
    "not_toml.toml": "workers = \n",
    "bad_bind.toml": 'bind = ["tcp://127.0.0.1"]\n',
    "app_raises.py": 'raise RuntimeError("boom at import")\n',
    "app_syntax.py": "def broken(:\n",
    "app_needs_dep.py": "import os\nimport no_such_dependency_xyz\n",
}

# <linux/prctl.h> and <linux/capability.h>: what a root test drops to run a child unprivileged.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_NET_BIND_SERVICE = 10


@dataclasses.dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def prefork_run(directory: Path, *args: str, env: dict[str, str] | None = None,
                preexec_fn: Callable[[], None] | None = None) -> Outcome:
    """`python -m prefork run ARGS` in *directory*, in a session of its own, with only the
    PREFORK_* variables of *env*; what it printed and its exit code."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    environ.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "run", *args], cwd=directory, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid)
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        pytest.fail(f"prefork run {args} was still running after {RUN_TIMEOUT}s:\n{err}")
    finally:
        kill_process_group(proc.pid)  # any worker a master left (there should be none)
    return Outcome(proc.returncode, out, err)


def assert_refused(outcome: Outcome, code: int, message: str, before_master: bool) -> None:
    """Exit *code*, *message* within one line of stderr, no traceback and no stray lines."""
    err = outcome.stderr
    assert outcome.code == code, f"exit {outcome.code}, expected {code}:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    if before_master:
        assert len(lines) == 1 and lines[0].startswith("prefork: error: "), err
    assert all(STDERR_LINE.match(line) for line in lines), f"a message spans several lines:\n{err}"
    assert any(message in line for line in lines), f"{message!r} not in:\n{err}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "dir.toml").mkdir()
    return tmp_path


BIND_SPECS = "accepted forms: tcp://HOST:PORT, udp://HOST:PORT"

# (arguments after `run`, PREFORK_* environment, exit code, message; {tmp} is the directory,
# before_master: the CLI refuses it before a master starts).
CASES: list[Any] = [
    # -- malformed bind specs: the spec, what is wrong, the accepted forms, where it was given
    pytest.param(["workers.echo", "-b", "tcp://127.0.0.1"], {}, EXIT_USAGE,
                 f"bind spec 'tcp://127.0.0.1': missing ':PORT'; {BIND_SPECS}", True, id="bind-no-port"),
    pytest.param(["workers.echo", "-b", "tcp://127.0.0.1:99999"], {}, EXIT_USAGE,
                 "bind spec 'tcp://127.0.0.1:99999': port '99999' is not a number from 0 to 65535", True,
                 id="bind-port-range"),
    pytest.param(["workers.echo", "-b", "udp://127.0.0.1:-1"], {}, EXIT_USAGE,
                 "bind spec 'udp://127.0.0.1:-1': port '-1' is not a number from 0 to 65535", True,
                 id="bind-negative-port"),
    pytest.param(["workers.echo", "-b", "foo://x:1"], {}, EXIT_USAGE,
                 f"bind spec 'foo://x:1': unknown scheme 'foo'; {BIND_SPECS}", True, id="bind-scheme"),
    pytest.param(["workers.echo", "-b", "tcp://[::1:80"], {}, EXIT_USAGE,
                 "bind spec 'tcp://[::1:80': missing ']' after the IPv6 address", True, id="bind-bracket"),
    pytest.param(["workers.echo", "-b", ""], {}, EXIT_USAGE, "bind spec '': empty bind spec", True,
                 id="bind-empty"),
    pytest.param(["workers.echo", "-b", "unix:"], {}, EXIT_USAGE,
                 "bind spec 'unix:': missing the socket's path after 'unix:'", True, id="bind-unix-no-path"),
    pytest.param(["workers.echo", "-b", "fd://abc"], {}, EXIT_USAGE,
                 "bind spec 'fd://abc': 'abc' is not a file descriptor number", True, id="bind-fd"),
    pytest.param(["workers.echo"], {"PREFORK_BIND": "tcp://127.0.0.1"}, EXIT_USAGE,
                 "bind spec 'tcp://127.0.0.1': missing ':PORT'", True, id="bind-env"),
    pytest.param(["workers.echo", "-c", "bad_bind.toml"], {}, EXIT_USAGE,
                 "bind spec 'tcp://127.0.0.1': missing ':PORT'", True, id="bind-toml"),
    # -- config files
    pytest.param(["workers.echo", "-c", "missing.toml"], {}, EXIT_USAGE,
                 "config file {tmp}/missing.toml: not found", True, id="config-missing"),
    pytest.param(["workers.echo", "-c", "dir.toml"], {}, EXIT_USAGE,
                 "config file {tmp}/dir.toml: is a directory, not a TOML file", True, id="config-directory"),
    pytest.param(["workers.echo", "-c", "not_toml.toml"], {}, EXIT_USAGE,
                 "config file {tmp}/not_toml.toml: not valid TOML: Invalid value (at line 1, column 11)", True,
                 id="config-not-toml"),
    # -- values of the wrong type or out of range: setting, value, what is allowed, where
    pytest.param(["workers.echo", "-c", "wrong_type.toml"], {}, EXIT_USAGE,
                 "setting 'workers': 'two' is not allowed; expected an integer (in {tmp}/wrong_type.toml)", True,
                 id="type-toml-int"),
    pytest.param(["workers.echo", "-c", "switch_text.toml"], {}, EXIT_USAGE,
                 "setting 'preload': 'yes' is not allowed; expected true or false (in {tmp}/switch_text.toml)",
                 True, id="type-toml-bool"),
    pytest.param(["workers.echo", "-c", "negative_user.toml"], {}, EXIT_USAGE,
                 "setting 'user': -5 is not allowed; expected a name, a number from 0 to 4294967294 or nothing "
                 "(in {tmp}/negative_user.toml)", True, id="range-toml-negative-id"),
    pytest.param(["workers.echo"], {"PREFORK_TIMEOUT": "soon"}, EXIT_USAGE,
                 "setting 'timeout': 'soon' is not allowed; expected a number (environment variable "
                 "PREFORK_TIMEOUT)", True, id="type-env-float"),
    pytest.param(["workers.echo"], {"PREFORK_MODE": "turbo"}, EXIT_USAGE,
                 "setting 'mode': 'turbo' is not allowed; expected one of: sync, thread, fork, asyncio (environment "
                 "variable PREFORK_MODE)", True, id="type-env-choice"),
    pytest.param(["workers.echo", "--loglevel", "loud"], {}, EXIT_USAGE,
                 "setting 'loglevel': 'loud' is not allowed; expected one of: debug, info, warning, error, "
                 "critical (command line --loglevel)", True, id="type-cli-choice"),
    pytest.param(["workers.echo", "--max-worker-memory", "12XB"], {}, EXIT_USAGE,
                 "setting 'max_worker_memory': '12XB' is not allowed; expected a size in bytes", True,
                 id="type-cli-size"),
    pytest.param(["workers.echo", "--reuse-port=yes"], {}, EXIT_USAGE,
                 "setting 'reuse_port' is a switch and takes no value (given 'yes'): write --reuse-port for "
                 "true or --no-reuse-port for false", True, id="type-cli-switch-value"),
    pytest.param(["workers.echo", "--backlog=--"], {}, EXIT_USAGE,
                 "setting 'backlog': '--' is not allowed; expected an integer (command line --backlog)", True,
                 id="type-cli-dashes"),
    pytest.param(["workers.echo", "-w", "5000"], {}, EXIT_USAGE,
                 "setting 'workers': '5000' is not allowed; expected an integer from 0 to 1023 (command line "
                 "--workers)", True, id="range-workers-above-scoreboard"),
    pytest.param(["workers.echo", "--read-timeout", "1e300"], {}, EXIT_USAGE,
                 "setting 'read_timeout': '1e300' is not allowed; expected a number from 0 to 1e+09", True,
                 id="range-seconds-overflow"),
    pytest.param(["workers.echo", "--timeout", "1e999"], {}, EXIT_USAGE,
                 "setting 'timeout': '1e999' is not allowed; expected a number (command line --timeout)", True,
                 id="range-infinite-seconds"),
    # -- unknown names: the name and the closest valid one
    pytest.param(["workers.echo", "-c", "unknown_key.toml"], {}, EXIT_USAGE,
                 "config file {tmp}/unknown_key.toml: unknown setting 'wrkers'; did you mean 'workers'?", True,
                 id="unknown-toml"),
    pytest.param(["workers.echo"], {"PREFORK_WRKERS": "2"}, EXIT_USAGE,
                 "unknown environment variable PREFORK_WRKERS; did you mean PREFORK_WORKERS?", True,
                 id="unknown-env"),
    pytest.param(["--wrkers", "2", "workers.echo"], {}, EXIT_USAGE,
                 "unknown option '--wrkers'; did you mean '--workers'?", True, id="unknown-cli-before-app"),
    pytest.param(["workers.echo", "--max-request", "2"], {}, EXIT_USAGE,
                 "unknown option '--max-request'; did you mean '--max-requests'?", True, id="unknown-cli-after-app"),
    # -- apps that cannot be loaded: in the CLI, in the master (preload) or in the workers
    pytest.param(["no_such_module_xyz:Handler"], {}, EXIT_APP_LOAD,
                 "cannot load 'no_such_module_xyz:Handler': no module named 'no_such_module_xyz'", True,
                 id="app-no-module"),
    pytest.param(["app_raises", "-w", "1"], {}, EXIT_APP_LOAD,
                 "cannot load 'app_raises': importing 'app_raises' raised RuntimeError: boom at import "
                 "(at {tmp}/app_raises.py:1)", False, id="app-raises-in-worker"),
    pytest.param(["app_raises", "-w", "1", "--preload"], {}, EXIT_APP_LOAD,
                 "cannot load 'app_raises': importing 'app_raises' raised RuntimeError: boom at import "
                 "(at {tmp}/app_raises.py:1)", True, id="app-raises-preload"),
    pytest.param(["app_syntax", "-w", "1"], {}, EXIT_APP_LOAD,
                 "cannot load 'app_syntax': importing 'app_syntax' raised SyntaxError: invalid syntax "
                 "(at {tmp}/app_syntax.py:1)", False, id="app-syntax-error"),
    pytest.param(["app_needs_dep", "-w", "1", "--preload"], {}, EXIT_APP_LOAD,
                 "cannot load 'app_needs_dep': importing 'app_needs_dep' failed: ModuleNotFoundError: No module "
                 "named 'no_such_dependency_xyz' (at {tmp}/app_needs_dep.py:2)", True, id="app-missing-dependency"),
    pytest.param(["workers.echo:NoSuchHandler", "-w", "1"], {}, EXIT_APP_LOAD,
                 "cannot load 'workers.echo:NoSuchHandler': module 'workers.echo' has no attribute "
                 "'NoSuchHandler'", False, id="app-missing-attribute"),
    pytest.param(["workers.echo:NoSuchHandler", "-w", "1", "--preload"], {}, EXIT_APP_LOAD,
                 "cannot load 'workers.echo:NoSuchHandler': module 'workers.echo' has no attribute "
                 "'NoSuchHandler'", True, id="app-missing-attribute-preload"),
    # -- a handler for the other kind of socket: the handler and the listener
    pytest.param(["workers.echo:DatagramHandler", "-w", "1", "-b", "tcp://127.0.0.1:0"], {}, EXIT_APP_LOAD,
                 "workers.echo.DatagramHandler is a DatagramRequestHandler; it cannot serve the stream listener "
                 "tcp://127.0.0.1:", False, id="datagram-handler-on-stream"),
    pytest.param(["workers.echo:DatagramHandler", "-w", "1", "-b", "tcp://127.0.0.1:0", "--preload"], {},
                 EXIT_APP_LOAD, "workers.echo.DatagramHandler is a DatagramRequestHandler; it cannot serve the "
                 "stream listener tcp://127.0.0.1:", True, id="datagram-handler-on-stream-preload"),
    pytest.param(["workers.echo:StreamHandler", "-w", "1", "-b", "udp://127.0.0.1:0"], {}, EXIT_APP_LOAD,
                 "workers.echo.StreamHandler is a StreamRequestHandler; it cannot serve the datagram listener "
                 "udp://127.0.0.1:", False, id="stream-handler-on-datagram"),
    pytest.param(["workers.http", "-w", "1", "-b", "udp://127.0.0.1:0"], {}, EXIT_APP_LOAD,
                 "has no DatagramHandler, so it cannot serve the datagram listener udp://127.0.0.1:", False,
                 id="stream-service-on-datagram"),
    pytest.param(["workers.echo", "-w", "1", "--post-fork", "no_such_module_xyz:hook"], {}, EXIT_APP_LOAD,
                 "setting 'post_fork': cannot load 'no_such_module_xyz:hook': no module named "
                 "'no_such_module_xyz'", True, id="hook-no-module"),
    # -- listeners that cannot be bound: the address and the reason
    pytest.param(["workers.echo", "-w", "1", "-b", "tcp://192.0.2.1:0"], {}, EXIT_BIND,
                 "cannot listen on tcp://192.0.2.1:0: cannot assign requested address (no local interface has "
                 "this address)", True, id="listen-foreign-address"),
    pytest.param(["workers.echo", "-w", "1", "-b", "unix:{tmp}/no-such-dir/echo.sock"], {}, EXIT_BIND,
                 "cannot listen on unix:{tmp}/no-such-dir/echo.sock: the directory {tmp}/no-such-dir does not "
                 "exist", True, id="listen-unix-missing-directory"),
    pytest.param(["workers.echo", "-w", "1", "-b", "fd://999"], {}, EXIT_BIND,
                 "cannot listen on fd://999: file descriptor 999: no such open file descriptor", True,
                 id="listen-fd-not-open"),
]


@pytest.mark.parametrize("args, env, code, message, before_master", CASES)
def test_bad_input_exits_with_its_code_and_one_clear_line(workdir: Path, args: list[str], env: dict[str, str],
                                                          code: int, message: str, before_master: bool) -> None:
    args = [arg.format(tmp=workdir) for arg in args]
    outcome = prefork_run(workdir, *args, env=env)
    assert_refused(outcome, code, message.format(tmp=workdir), before_master)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_a_port_in_use_exits_4_naming_the_address(tmp_path: Path, kind: int) -> None:
    scheme = "tcp" if kind == socket.SOCK_STREAM else "udp"
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        port = taken.getsockname()[1]
        outcome = prefork_run(tmp_path, "workers.echo", "-w", "1", "-b", f"{scheme}://127.0.0.1:{port}")
    assert_refused(outcome, EXIT_BIND, f"cannot listen on {scheme}://127.0.0.1:{port}: address already in use",
                   before_master=True)


# -- without privileges -----------------------------------------------------------------------------


def _drop_capabilities(*capabilities: int) -> Callable[[], None]:
    """A preexec_fn that removes *capabilities* from the bounding set: the program exec'd next
    runs as root but without them, as an ordinary user would (for root, exec gives the bounding
    set as the permitted one)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for capability in capabilities:
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability})")
    return drop


def unprivileged(*capabilities: int) -> Callable[[], None] | None:
    """How to run `prefork run` without *capabilities*: as it is when the tests are not root;
    as root, without them in its bounding set. Not as user nobody: the interpreter may live
    where nobody cannot read it (here under /root, mode 0700), and the capabilities are exactly
    the privilege these cases are about. Skips when root may not drop them (no CAP_SETPCAP)."""
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run([sys.executable, "-c", ""], preexec_fn=_drop_capabilities(*capabilities), check=True,
                       timeout=RUN_TIMEOUT)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"running as root and cannot drop capabilities {capabilities} from the bounding set "
                    f"(prctl PR_CAPBSET_DROP needs CAP_SETPCAP): {exc}")
    return _drop_capabilities(*capabilities)


def test_a_privileged_port_without_privilege_exits_4(tmp_path: Path) -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1:
        pytest.skip("net.ipv4.ip_unprivileged_port_start is 0 or 1: every port is unprivileged here")
    outcome = prefork_run(tmp_path, "workers.echo", "-w", "1", "-b", "tcp://127.0.0.1:1",
                          preexec_fn=unprivileged(CAP_NET_BIND_SERVICE))
    assert_refused(outcome, EXIT_BIND, "cannot listen on tcp://127.0.0.1:1: permission denied (ports below "
                   "1024 need privileges)", before_master=True)


def test_an_unreadable_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "secret.toml"
    config.write_text("workers = 1\n")
    config.chmod(0)
    outcome = prefork_run(tmp_path, "workers.echo", "-c", "secret.toml",
                          preexec_fn=unprivileged(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH))
    assert_refused(outcome, EXIT_USAGE, f"config file {config}: cannot be read: Permission denied",
                   before_master=True)
