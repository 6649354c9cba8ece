"""What the workers' user cannot reach is named: the user, the path that stops it, the fix.

Real masters as root whose workers switch to nobody (CI runs the suite as root): an app under
a directory nobody cannot enter (a home directory, mode 0700) or in a file nobody cannot read
stops the master with exit code 3 and that cause, not "no module named"; a working directory
or a log file nobody cannot reach is a warning at start, and a failed reopen on USR1 says why.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

from prefork.errors import EXIT_APP_LOAD
from prefork.loader import locate
from tests.integration.conftest import ROOT
from tests.reliability.test_security import GROUP, USER, require_root
from tests.support import wait_until

pytestmark = pytest.mark.reliability

APPS = ROOT / "tests" / "integration" / "apps.py"
NOBODY = f"workers run as {USER} (uid 65534)"  # nobody's uid on Debian and most distributions


def app_copy(directory: Path, name: str = "locked_app", mode: int = 0o644) -> Path:
    directory.mkdir(exist_ok=True)
    copy = directory / f"{name}.py"
    shutil.copyfile(APPS, copy)
    copy.chmod(mode)
    return copy


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def test_an_app_under_a_directory_nobody_cannot_enter_is_named_with_the_user(start_master, open_dir):
    private = open_dir / "home"
    copy = app_copy(private)
    private.chmod(0o700)
    master = start_master(app="locked_app", pythonpath=private, user=USER, group=GROUP, ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    log = master.log()
    assert (f"cannot load 'locked_app': {NOBODY}, which cannot enter {private}: Permission denied "
            f"(the app's module {copy}); make the app readable by that user or choose another user") in log
    assert "no module named" not in log and "Traceback" not in log


def test_an_app_file_nobody_cannot_read_is_named_with_the_user(start_master, open_dir):
    copy = app_copy(open_dir / "lib", mode=0o600)
    master = start_master(app="locked_app", pythonpath=copy.parent, user=USER, group=GROUP, ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert f"{NOBODY}, which cannot read {copy}: Permission denied (the app's module {copy})" in master.log()


def test_a_missing_app_is_still_missing(start_master, readable_app):
    master = start_master(app="no_such_app", pythonpath=readable_app["pythonpath"], user=USER, group=GROUP,
                          ready=False)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "could not load the app: cannot load 'no_such_app': no module named 'no_such_app'\n" in master.log()


def test_a_working_directory_nobody_cannot_read_is_a_warning(start_master, readable_app, open_dir):
    cwd = open_dir / "private"
    cwd.mkdir(mode=0o700)
    master = start_master(cwd=cwd, user=USER, group=GROUP, **readable_app)
    assert master.request(b"hello") == b"hello"  # a warning: the app is elsewhere
    assert (f"{NOBODY}, which cannot read {cwd}: Permission denied (the working directory {cwd}, where "
            f"relative paths and imports from it fail in the workers); start the master in a directory it "
            f"can read or choose another user") in master.log()


def test_a_log_file_nobody_cannot_reopen_is_a_warning_and_reopening_says_why(start_master, readable_app,
                                                                             open_dir):
    error_log = open_dir / "error.log"  # created by the master, as root: 0644, root's
    master = start_master(error_log=str(error_log), user=USER, group=GROUP, **readable_app)
    assert (f"{NOBODY}, which cannot write {error_log}: Permission denied (the log file {error_log}, which "
            f"the workers reopen on USR1); make the file and its directory writable by that user or choose "
            f"another user") in error_log.read_text()
    master.wait_workers(2)
    master.signal(signal.SIGUSR1)
    wait_until(lambda: f"cannot reopen log file {error_log}: {NOBODY}" in error_log.read_text(),
               message=error_log.read_text())


# -- locate: where an import would read the app, found without running it ----------------------


def test_locate_finds_modules_and_packages_without_importing_them(tmp_path, monkeypatch):
    package = tmp_path / "pkg_never_run"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "mod.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert locate("pkg_never_run.mod:App") == str(package / "mod.py")
    assert locate("pkg_never_run") == str(package / "__init__.py")
    assert locate("tests.integration.apps") == str(APPS)  # a package already imported
    assert locate("pkg_never_run.missing") is None and locate("no_such_module_at_all") is None
    assert "pkg_never_run" not in sys.modules
