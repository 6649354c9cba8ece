"""Privileges, file permissions, and what crosses a process boundary.

- With ``user``/``group``, every worker runs as that user and group (real, effective, saved and
  file-system ids; no supplementary root group) before the app is imported; the master stays
  root to bind, rebind and signal, and imports no app code (without ``preload``). A port below
  1024 works because the master binds it. These need root (CI runs the suite as root).
- Unix socket files get ``unix_mode``/``unix_owner``/``unix_group``; the pidfile, the scoreboard
  and the log files are never world-writable, and group-writable only if the umask allows.
- Nothing that crosses a process boundary is unpickled or evaluated (a static scan of prefork/
  and workers/), and each boundary datum is parsed strictly: malformed values are refused with
  an error naming them, never a traceback. The boundary data are:

  ===========================  ==========================  ======================================
  datum                        written by                  read by (parser)
  ===========================  ==========================  ======================================
  PREFORK_FDS (env)            the master before USR2      the new master (handover.inherited_listeners)
  PREFORK_UPGRADE_PARENT (env) the master before USR2      the new master (handover.upgrade_parent)
  LISTEN_FDS, LISTEN_PID,      systemd                     the master (handover.systemd_fds)
  LISTEN_FDNAMES (env)
  NOTIFY_SOCKET (env)          systemd                     the master (notify: a path or @name)
  the scoreboard map / file    master and workers          master, ``prefork status``, metrics
                                                           (fixed ctypes fields; Scoreboard.open)
  the boot-error pipe          a worker that cannot boot   the master (bytes, decoded as text)
  ``prefork status --json``    the CLI, from the scoreboard  people and tools; prefork never reads it
  ===========================  ==========================  ======================================
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import grp
import json
import os
import pwd
import re
import socket
import stat
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from prefork import control, handover
from prefork.errors import ConfigError, ListenerError, PreforkError
from prefork.handover import inherited_listeners, upgrade_parent
from prefork.scoreboard import Scoreboard, _Header, _Slot
from tests.support import SOCKET_TIMEOUT, skip_or_fail, wait_until

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
USER, GROUP = "nobody", "nogroup"
# Ports below this need privileges to bind (net.ipv4.ip_unprivileged_port_start's default).
PRIVILEGED_PORTS = 1024
# Privileged ports tried, from the top, when looking for a free one.
PORT_CANDIDATES = range(1023, 900, -1)


def require_root() -> None:
    """Skip (fail under CI_REQUIRE_TOOLS=1) unless the tests run as root, as CI runs them."""
    if os.geteuid() != 0:
        skip_or_fail(f"needs root: switching workers to {USER}/{GROUP} and binding a port below "
                     f"{PRIVILEGED_PORTS} are privileged (CI runs the suite as root)")


def ids() -> tuple[int, int]:
    """(uid of USER, gid of GROUP)."""
    return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid


def proc_status(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status, as numbers."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            found[key] = [int(n) for n in value.split()]
    return found


def assert_runs_as(pid: int, uid: int, gid: int) -> None:
    status = proc_status(pid)
    assert status["Uid"] == [uid] * 4, status  # real, effective, saved, file system
    assert status["Gid"] == [gid] * 4, status
    allowed = set(os.getgrouplist(USER, gid))
    assert set(status["Groups"]) <= allowed and 0 not in status["Groups"], status


def free_privileged_port(candidates: Sequence[int] = PORT_CANDIDATES) -> int:
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free TCP port in {candidates} on 127.0.0.1")


# -- who workers run as ---------------------------------------------------------------------------


@pytest.fixture
def root_groups() -> Iterator[None]:
    """The masters started meanwhile have root's group as a supplementary group, as a login
    shell or a service manager may give them, so a worker that kept it would show it."""
    require_root()
    previous = os.getgroups()
    os.setgroups(sorted({0, *previous}))
    try:
        yield
    finally:
        os.setgroups(previous)


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_workers_run_as_the_user_and_group_and_the_master_stays_root(root_groups, start_master, readable_app,
                                                                    mode):
    uid, gid = ids()
    master = start_master(user=USER, group=GROUP, workers=2, mode=mode, **readable_app)
    workers = master.wait_workers(2)
    for pid in workers:
        assert_runs_as(pid, uid, gid)
    assert proc_status(master.pid)["Uid"] == [0] * 4  # to bind, rebind and signal
    assert 0 in proc_status(master.pid)["Groups"]  # what the workers had to give up
    # The app was imported in a worker, after the switch: the master runs no app code.
    imported_in = int(master.request(b"imported-in"))
    assert imported_in in workers and imported_in != master.pid


def test_the_metrics_process_gives_up_root_once_its_port_is_bound(root_groups, start_master, readable_app):
    """It serves HTTP: after binding metrics_bind it runs as the service's user, and still
    reads the scoreboard (the inherited map, whatever the file's mode: here 0600, root's)."""
    uid, gid = ids()
    master = start_master(user=USER, group=GROUP, workers=2, umask=0o077, metrics_bind="tcp://127.0.0.1:0",
                          **readable_app)
    workers = master.wait_workers(2)
    url = wait_until(lambda: re.search(r"metrics on (http://\S+)", master.log()), message=master.log()).group(1)
    (metrics_pid,) = [child.pid for child in psutil.Process(master.pid).children() if child.pid not in workers]
    assert_runs_as(metrics_pid, uid, gid)
    for _ in range(3):
        master.request(b"count me")

    def counted() -> bool:
        with urllib.request.urlopen(url, timeout=SOCKET_TIMEOUT) as response:
            text = response.read().decode()
        served = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("prefork_requests_total{")]
        return "prefork_up{" in text and sum(served) >= 3
    wait_until(counted, message=master.log())


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_privileged_port_works_with_an_unprivileged_user(root_groups, start_master, readable_app, reuse_port):
    uid, gid = ids()
    # free_privileged_port() probes and the master binds later: the two cases, which xdist may run
    # at once, look in ranges of their own (both took 1023 once: "address already in use").
    port = free_privileged_port(PORT_CANDIDATES[1::2] if reuse_port else PORT_CANDIDATES[::2])
    master = start_master(bind=[f"tcp://127.0.0.1:{port}"], user=USER, group=GROUP, workers=2,
                          reuse_port=reuse_port, **readable_app)
    assert master.address() == ("127.0.0.1", port)
    for _ in range(4):
        assert master.request(b"hello") == b"hello"
    for pid in master.wait_workers(2):
        assert_runs_as(pid, uid, gid)


def test_unix_socket_files_get_the_configured_mode_owner_and_group(start_master, sock_dir, readable_app):
    require_root()
    uid, gid = ids()
    path = sock_dir / "s.sock"
    master = start_master(bind=[f"unix:{path}"], unix_mode=0o660, unix_owner=USER, unix_group=GROUP,
                          user=USER, group=GROUP, **readable_app)
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o660, uid, gid)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(SOCKET_TIMEOUT)
        client.connect(str(path))
        client.sendall(b"pid\n")
        assert int(client.recv(100)) in master.wait_workers(2)


# -- file permissions ------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("umask", [None, 0o077, 0o002, 0o000])
def test_pidfile_scoreboard_and_logs_are_never_world_writable(start_master, tmp_path, umask):
    error_log, access_log = tmp_path / "error.log", tmp_path / "access.log"
    options = {} if umask is None else {"umask": umask}
    master = start_master(error_log=str(error_log), access_log=str(access_log), **options)
    assert master.request(b"hello") == b"hello"
    effective = current_umask() if umask is None else umask
    files = {
        "pidfile": (master.pidfile, 0o644),  # anyone may read the pid; rule of prefork.pidfile
        "scoreboard": (Path(f"{master.pidfile}.scoreboard"), 0o644 & ~effective),
        "error_log": (error_log, 0o644 & ~effective),
        "access_log": (access_log, 0o644 & ~effective),
    }
    for name, (path, expected) in files.items():
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o002 == 0, f"{name} {path} is world-writable: {mode:#o}"
        assert mode & 0o020 == 0 or not effective & 0o020, f"{name} {path} is group-writable: {mode:#o}"
        assert mode == expected, f"{name} {path}: {mode:#o}, expected {expected:#o} (umask {effective:#o})"


# -- nothing crossing a process boundary is unpickled or evaluated ---------------------------------


# Modules that turn bytes into objects (code included): none may be imported.
_UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle",
                   "copyreg"}
# Builtins that run code from data.
_UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
# The exceptions, each with its reason:
# - importlib.import_module(name) in prefork/loader.py and prefork/cli.py: the app's
#   "module:attribute" comes from the operator's configuration (like any program's argv), not
#   from a peer process, and is imported as Python code on purpose; cli.py imports prefork.log.
# - __import__("socket" / "select") with a constant name: no data involved.
# - ast.literal_eval in prefork/cli.py reads DEFAULT_BIND from the app's source: literals only.
_IMPORT_MODULE_ALLOWED = {"prefork/loader.py", "prefork/cli.py"}


def _sources() -> Iterator[tuple[str, ast.AST]]:
    for package in ("prefork", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def _problems(name: str, tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] in _UNSAFE_MODULES:
                    yield f"{name}:{node.lineno}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").partition(".")[0] in _UNSAFE_MODULES:
            yield f"{name}:{node.lineno}: from {node.module} import ..."
        elif isinstance(node, ast.Call):
            yield from _call_problems(name, node)


def _call_problems(name: str, node: ast.Call) -> Iterator[str]:
    func = node.func
    constant_args = all(isinstance(arg, ast.Constant) for arg in node.args)
    if isinstance(func, ast.Name) and func.id in _UNSAFE_CALLS:
        if not (func.id == "__import__" and constant_args):
            yield f"{name}:{node.lineno}: {func.id}(...)"
    elif isinstance(func, ast.Attribute):
        if func.attr == "import_module" and name not in _IMPORT_MODULE_ALLOWED:
            yield f"{name}:{node.lineno}: importlib.import_module(...)"
        if func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "yaml":
            yield f"{name}:{node.lineno}: yaml.load(...)"
        if func.attr in ("system", "popen") and isinstance(func.value, ast.Name) and func.value.id == "os":
            yield f"{name}:{node.lineno}: os.{func.attr}(...): a shell"
        if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
               for k in node.keywords):
            yield f"{name}:{node.lineno}: shell=...: a shell"


def test_nothing_is_unpickled_or_evaluated() -> None:
    sources = list(_sources())
    assert len(sources) > 20  # the scan really reads the packages
    problems = [problem for name, tree in sources for problem in _problems(name, tree)]
    assert problems == []


def test_the_scan_finds_what_it_looks_for() -> None:
    bad = ("import pickle\nfrom marshal import loads\nimport shelve\neval(data)\nexec(data)\n"
           "compile(data, 'x', 'exec')\n__import__(name)\nimportlib.import_module(name)\nyaml.load(s)\n"
           "os.system(cmd)\nsubprocess.run(cmd, shell=True)\n")
    assert len(list(_problems("prefork/x.py", ast.parse(bad)))) == 11
    fine = "__import__('select')\nimportlib.import_module(name)\nast.literal_eval(node)\nre.compile('x')\n"
    assert list(_problems("prefork/loader.py", ast.parse(fine))) == []


# -- boundary data: malformed values are refused clearly -----------------------------------------


class _FakeSocket:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        pass


@given(st.text(max_size=60) | st.text(alphabet="0123456789:;%tcp/[]x-", max_size=40))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_prefork_fds_junk_is_refused_with_a_listener_error(value: str) -> None:
    # No real descriptor is touched: the wrapping of each fd is replaced by a fake.
    with mock.patch.object(handover, "_inherited_socket", lambda fd, text: _FakeSocket(fd)):
        try:
            found = inherited_listeners({"PREFORK_FDS": value})
        except ListenerError as exc:
            assert "PREFORK_FDS" in str(exc) and exc.exit_code == 4
            return
    for text, sock in found.items():
        assert text and 0 <= sock.fd <= 2**31 - 1


@pytest.mark.parametrize("value", ["x", "3", "3:", ":tcp://h:1", "-1:tcp://h:1", "99999999999:tcp://h:1",
                                   "4294967296:tcp://h:1", "٣:tcp://h:1"])
def test_prefork_fds_entries_that_are_not_fd_and_spec_name_the_variable(value: str) -> None:
    with pytest.raises(ListenerError, match=r"PREFORK_FDS: entry .* is not FD:SPEC"):
        inherited_listeners({"PREFORK_FDS": value})


@given(pid=st.sampled_from([str(os.getpid()), "", "1", "x"]) | st.text(max_size=8),
       count=st.text(max_size=9) | st.integers(0, 10**7).map(str),
       names=st.none() | st.text(max_size=40))
@settings(max_examples=300)
def test_systemd_variables_junk_is_refused_or_read_within_bounds(pid: str, count: str, names: Any) -> None:
    environ = {"LISTEN_PID": pid, "LISTEN_FDS": count, **({} if names is None else {"LISTEN_FDNAMES": names})}
    try:
        passed = handover.systemd_fds(environ)
    except ListenerError as exc:
        assert "LISTEN_FDS" in str(exc)
        return
    assert all(3 <= fd < 3 + len(passed) for _, fd in passed)
    assert len(passed) <= handover._open_files_limit()


@given(st.text(max_size=12) | st.integers(-(10**12), 10**12).map(str))
def test_upgrade_parent_junk_is_refused_with_a_config_error(value: str) -> None:
    try:
        pid = upgrade_parent({"PREFORK_UPGRADE_PARENT": value})
    except ConfigError as exc:
        assert "PREFORK_UPGRADE_PARENT" in str(exc)
        return
    assert 0 <= pid <= 2**31 - 1 and (pid == 0 or str(pid) == value)


@pytest.mark.parametrize("env, code, message", [
    ({"PREFORK_UPGRADE_PARENT": "12x"}, 2, "PREFORK_UPGRADE_PARENT='12x' is not a process id"),
    ({"PREFORK_FDS": "3:tcp://127.0.0.1:1;junk"}, 4, "entry 'junk' is not FD:SPEC"),
    ({"PREFORK_FDS": "9999999999:tcp://127.0.0.1:1"}, 4, "is not FD:SPEC"),
])
def test_a_master_refuses_malformed_hand_over_variables(start_master, env, code, message):
    master = start_master(env=env, ready=False)
    assert master.wait_exit() == code
    log = master.log()
    assert message in log and "Traceback" not in log


def _scoreboard_bytes(capacity: int, data: Any) -> bytes:
    """A header of the right layout for *capacity* slots, then slots of random bytes."""
    header = _Header()
    header.magic, header.capacity = b"PFSB0001", capacity
    size = capacity * ctypes.sizeof(_Slot)
    return bytes(header) + data.draw(st.binary(min_size=size, max_size=size))


@given(st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_scoreboard_file_of_junk_is_refused_or_read_as_finite_values(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("board") / "x.scoreboard"
    junk = data.draw(st.sampled_from(["random", "header", "slots"]))
    if junk == "random":
        content = data.draw(st.binary(max_size=400))
    elif junk == "header":
        content = b"PFSB0001" + data.draw(st.binary(max_size=400))
    else:
        content = _scoreboard_bytes(data.draw(st.integers(0, 3)), data)
    path.write_bytes(content)
    try:
        board = Scoreboard.open(str(path))
    except ValueError as exc:
        assert str(path) in str(exc)
        return
    try:
        view = board.master()
        rows = [control._worker_row(slot, None, 1000.0) for slot in board.used()]
        json.dumps({"master": dataclasses.asdict(view), "workers": rows}, allow_nan=False)  # valid JSON, whatever the bytes
        for slot in board.used():
            control._duration(slot.request_age(1000.0))
    finally:
        board.close()


def test_status_names_an_unreadable_scoreboard_instead_of_a_traceback(tmp_path: Path) -> None:
    """A user the master's umask keeps out of the scoreboard gets an error naming the file."""
    board = tmp_path / "master.pid.scoreboard"
    board.write_bytes(b"")
    master = control.Master(str(tmp_path / "master.pid"), os.getpid())
    denied = PermissionError(13, "Permission denied", str(board))
    with mock.patch.object(Scoreboard, "open", side_effect=denied):
        with pytest.raises(PreforkError, match=r"cannot read the scoreboard .*: permission denied"):
            master.snapshot()
