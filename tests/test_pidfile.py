"""The pidfile: atomic, refused while a live process owns it, removed only while it is ours."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import prefork.pidfile as pidfile_module
from prefork.errors import PidfileError
from prefork.pidfile import Pidfile, is_running, read_pid
from tests.support import wait_until

# How long a helper process may take to start, answer, or exit.
CHILD_DEADLINE = 10.0

# A child that stays alive until its stdin closes, so the test decides when it ends.
WAIT_FOR_EOF = "import sys; sys.stdin.read()"


@contextlib.contextmanager
def child(code: str = WAIT_FOR_EOF, *args: str, **popen: object) -> Iterator[subprocess.Popen[str]]:
    """A Python child running *code* with *args*; stopped and reaped when the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=CHILD_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=CHILD_DEADLINE)
        proc.stdout.close()


def readline(proc: subprocess.Popen[str], timeout: float = CHILD_DEADLINE) -> str:
    """The child's next line of output, or AssertionError after *timeout*."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child {proc.pid} wrote nothing within {timeout}s"
    return proc.stdout.readline().strip()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=CHILD_DEADLINE)
    assert not is_running(proc.pid)
    return proc.pid


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "prefork.pid"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- create ------------------------------------------------------------------------------------

def test_create_writes_our_pid(path: Path) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    assert path.read_text() == f"{os.getpid()}\n"
    assert pidfile.pid == os.getpid()
    assert os.listdir(path.parent) == [path.name], "a temporary file was left behind"


def test_create_writes_a_given_pid(path: Path) -> None:
    Pidfile(path).create(4242)
    assert path.read_text() == "4242\n"


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_mode_is_0644_whatever_the_umask(path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        Pidfile(path).create()
    finally:
        os.umask(previous)
    assert mode_of(path) == 0o644


def test_path_is_absolute_so_chdir_does_not_move_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pidfile = Pidfile("relative.pid")
    assert pidfile.path == str(tmp_path / "relative.pid")
    monkeypatch.chdir("/")
    pidfile.create()
    assert (tmp_path / "relative.pid").read_text() == f"{os.getpid()}\n"


def test_refused_while_a_live_process_owns_it(path: Path) -> None:
    with child() as other:
        path.write_text(f"{other.pid}\n")
        with pytest.raises(PidfileError) as info:
            Pidfile(path).create()
        assert str(info.value) == (f"pidfile {path} belongs to running process {other.pid}; "
                                   f"is another master running?")
        assert path.read_text() == f"{other.pid}\n", "the live master's pidfile was changed"
        assert os.listdir(path.parent) == [path.name], "a temporary file was left behind"


def test_refused_for_a_live_process_of_another_user(path: Path) -> None:
    # pid 1 belongs to root; as root, os.kill(1, 0) succeeds, as anyone else it fails with EPERM:
    # either way it is alive and must not be overwritten.
    path.write_text("1\n")
    with pytest.raises(PidfileError, match=r"belongs to running process 1;"):
        Pidfile(path).create()


NOBODY_ASKS_ABOUT_ITS_PARENT = """
import os
from prefork.pidfile import is_running
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # nobody: the parent (root) is now another user's process
try:
    os.kill(os.getppid(), 0)
except PermissionError:
    print("EPERM", is_running(os.getppid()), flush=True)
else:
    print("no EPERM", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_eperm_counts_as_alive() -> None:
    with child(NOBODY_ASKS_ABOUT_ITS_PARENT) as proc:
        assert readline(proc) == "EPERM True"


@pytest.mark.parametrize("content", ["", "\n", "garbage\n", "0\n", "-1\n", "+12\n", "12abc\n",
                                     "99999999999\n", "1" * 5000, "\u0661\u0662\n"])
def test_garbage_is_stale_and_replaced(path: Path, content: str, caplog: pytest.LogCaptureFixture) -> None:
    path.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="prefork.pidfile"):
        Pidfile(path).create()
    assert path.read_text() == f"{os.getpid()}\n"
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage()
            and "stale" in r.getMessage()], "replacing a stale pidfile was not logged"


def test_dead_pid_is_stale_and_replaced(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = dead_pid()
    path.write_text(f"{gone}\n")
    with caplog.at_level(logging.WARNING, logger="prefork.pidfile"):
        Pidfile(path).create()
    assert path.read_text() == f"{os.getpid()}\n"
    assert any(str(gone) in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_zombie_is_stale(path: Path) -> None:
    with child() as zombie:
        zombie.stdin.close()
        # Not reaped yet: the kernel keeps the pid (os.kill(pid, 0) still succeeds) until we wait.
        wait_until(lambda: _state(zombie.pid) == "Z", timeout=CHILD_DEADLINE)
        path.write_text(f"{zombie.pid}\n")
        Pidfile(path).create()
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_thread_id_is_not_a_process(path: Path) -> None:
    # os.kill(tid, 0) succeeds on Linux for any live thread: a stale pidfile whose number is now
    # a thread's must not block the start.
    tid: list[int] = []
    release = threading.Event()
    thread = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), release.wait(10)))
    thread.start()
    try:
        wait_until(lambda: tid, timeout=CHILD_DEADLINE)
        os.kill(tid[0], 0)  # the trap: the kernel says this "process" exists
        path.write_text(f"{tid[0]}\n")
        Pidfile(path).create()
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        release.set()
        thread.join(CHILD_DEADLINE)


def test_our_own_pid_is_rewritten_silently(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.write_text(f"{os.getpid()}\n")
    with caplog.at_level(logging.DEBUG, logger="prefork.pidfile"):
        Pidfile(path).create()
    assert path.read_text() == f"{os.getpid()}\n"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_replaced_not_rewritten_in_place(path: Path) -> None:
    # A reader holding the old file open must never see a half-written new one: the new file
    # is a new inode put in place by rename, the old one is left as it was.
    gone = dead_pid()
    path.write_text(f"{gone}\n")
    with open(path) as old:
        Pidfile(path).create()
        assert old.read() == f"{gone}\n"
    assert path.read_text() == f"{os.getpid()}\n"


def test_missing_directory_names_path_and_reason(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "prefork.pid"
    with pytest.raises(PidfileError) as info:
        Pidfile(target).create()
    assert str(target) in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "prefork.pid"
    with pytest.raises(PidfileError, match="Not a directory") as info:
        Pidfile(target).create()
    assert str(target) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PidfileError, match="Permission denied") as info:
            Pidfile(tmp_path / "prefork.pid").create()
    finally:
        tmp_path.chmod(0o755)
    assert str(tmp_path / "prefork.pid") in str(info.value)


def test_path_is_a_directory(path: Path) -> None:
    path.mkdir()
    with pytest.raises(PidfileError) as info:
        Pidfile(path).create()
    assert str(path) in str(info.value)
    assert os.listdir(path.parent) == [path.name], "a temporary file was left behind"


STARTING_MASTER = """
import sys
from prefork.errors import PidfileError
from prefork.pidfile import Pidfile
sys.stdin.readline()
try:
    Pidfile(sys.argv[1]).create()
except PidfileError:
    print("refused", flush=True)
else:
    print("ok", flush=True)
sys.stdin.read()
"""


def test_of_masters_starting_together_one_wins(path: Path) -> None:
    # Each waits for "go", then creates the pidfile at once: exactly one may own it.
    with contextlib.ExitStack() as stack:
        masters = [stack.enter_context(child(STARTING_MASTER, str(path))) for _ in range(4)]
        for proc in masters:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        answers = sorted(readline(proc) for proc in masters)
        assert answers == ["ok", "refused", "refused", "refused"]
        assert read_pid(path) in [proc.pid for proc in masters]


def test_a_master_that_appears_while_we_write_wins(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between "nothing is there" and "ours is in place" another master may finish its own
    # create: its file must survive (the last step is exclusive, not a blind rename).
    write_temp = pidfile_module._write_temp
    with child() as other:
        def racing_write_temp(target: str, pid: int) -> str:
            temp = write_temp(target, pid)
            path.write_text(f"{other.pid}\n")
            return temp

        monkeypatch.setattr(pidfile_module, "_write_temp", racing_write_temp)
        with pytest.raises(PidfileError, match=f"belongs to running process {other.pid}"):
            Pidfile(path).create()
        assert path.read_text() == f"{other.pid}\n"


# -- rename and remove ---------------------------------------------------------------------------

def test_remove_deletes_our_file(path: Path) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    pidfile.remove()
    assert not path.exists()
    pidfile.remove()  # again: nothing there, nothing to do


def test_remove_before_create_leaves_the_file(path: Path) -> None:
    path.write_text("4242\n")
    Pidfile(path).remove()
    assert path.read_text() == "4242\n"


def test_remove_leaves_a_file_that_names_another_master(path: Path) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    path.write_text("4242\n")  # a new master took the path
    pidfile.remove()
    assert path.read_text() == "4242\n"


def test_remove_never_raises(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    path.unlink()
    path.mkdir()  # unreadable as a pidfile: worth a warning, not a failed stop
    with caplog.at_level(logging.WARNING, logger="prefork.pidfile"):
        pidfile.remove()
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_rename_moves_the_file(path: Path) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    oldbin = path.with_name(path.name + ".oldbin")
    pidfile.rename(oldbin)
    assert not path.exists()
    assert oldbin.read_text() == f"{os.getpid()}\n"
    assert pidfile.path == str(oldbin)
    pidfile.remove()
    assert not oldbin.exists()


def test_upgrade_hand_over(path: Path) -> None:
    # The old master moves aside, the new master (a live process) takes the path, the old
    # master leaves without touching the new master's file.
    old = Pidfile(path)
    old.create()
    old.rename(str(path) + ".oldbin")
    with child() as new_master:
        Pidfile(path).create(new_master.pid)
        old.remove()
        assert read_pid(path) == new_master.pid
        assert os.listdir(path.parent) == [path.name]


def test_upgrade_rolled_back(path: Path) -> None:
    # The new master died: the old one moves its pidfile back over the dead one's.
    old = Pidfile(path)
    old.create()
    oldbin = str(path) + ".oldbin"
    old.rename(oldbin)
    Pidfile(path).create(dead_pid())
    old.rename(path)
    assert read_pid(path) == os.getpid()
    assert not os.path.exists(oldbin)


def test_rename_refuses_a_target_owned_by_a_live_process(path: Path) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    target = path.with_name("other.pid")
    with child() as other:
        target.write_text(f"{other.pid}\n")
        with pytest.raises(PidfileError, match=f"{target} belongs to running process {other.pid}"):
            pidfile.rename(target)
        assert target.read_text() == f"{other.pid}\n"
    assert path.read_text() == f"{os.getpid()}\n"
    assert pidfile.path == str(path)


def test_rename_after_the_path_was_taken_writes_anew(path: Path) -> None:
    pidfile = Pidfile(path)
    pidfile.create()
    path.write_text("4242\n")  # not ours any more: must not be carried away
    oldbin = path.with_name("prefork.pid.oldbin")
    pidfile.rename(oldbin)
    assert path.read_text() == "4242\n"
    assert oldbin.read_text() == f"{os.getpid()}\n"


# -- read_pid ------------------------------------------------------------------------------------

def test_read_pid_of_a_live_master(path: Path) -> None:
    with child() as master:
        Pidfile(path).create(master.pid)
        assert read_pid(path) == master.pid


def test_read_pid_missing(path: Path) -> None:
    with pytest.raises(PidfileError) as info:
        read_pid(path)
    assert str(info.value) == f"no master running: {path} does not exist"


def test_read_pid_garbage(path: Path) -> None:
    path.write_text("hello\n")
    with pytest.raises(PidfileError) as info:
        read_pid(path)
    assert str(info.value) == f"pidfile {path} does not contain a pid: 'hello\\n'"


def test_read_pid_dead(path: Path) -> None:
    gone = dead_pid()
    path.write_text(f"{gone}\n")
    with pytest.raises(PidfileError) as info:
        read_pid(path)
    assert str(info.value) == (f"no master running: pidfile {path} names pid {gone}, "
                               f"which is not running (stale pidfile)")


def test_read_pid_unreadable(path: Path) -> None:
    path.mkdir()
    with pytest.raises(PidfileError, match=f"cannot read pidfile {path}: Is a directory"):
        read_pid(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=200)
@given(content=st.one_of(st.text(), st.integers().map(str), st.binary().map(lambda b: b.decode("latin-1"))))
def test_read_pid_returns_only_live_positive_pids(path: Path, content: str) -> None:
    # The CLI signals what read_pid returns: 0 or -1 would signal a whole process group.
    path.write_bytes(content.encode("utf-8", "surrogatepass"))
    try:
        pid = read_pid(path)
    except PidfileError as exc:
        assert str(path) in str(exc)
    else:
        assert pid >= 1 and is_running(pid)


def _state(pid: int) -> str:
    """The process state letter from /proc/PID/stat (after the parenthesised command name)."""
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rpartition(")")[2].split()[0]
