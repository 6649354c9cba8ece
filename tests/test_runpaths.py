"""Default pidfiles (prefork.runpaths): which directory, which name, and what is refused."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from prefork import runpaths
from prefork.errors import ConfigError


@pytest.fixture
def no_run_dir(tmp_path, monkeypatch):
    """No systemd RUNTIME_DIRECTORY, no XDG_RUNTIME_DIR, root's /run/prefork impossible: the
    temporary directory's fallback is all there is."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(runpaths, "ROOT_RUN_DIR", str(blocker / "prefork"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return {"XDG_RUNTIME_DIR": ""}


def test_the_fallback_always_exists_and_is_private_to_the_user(no_run_dir, tmp_path):
    path = runpaths.default_pidfile("echo", no_run_dir)
    fallback = tmp_path / f"prefork-{os.geteuid()}"
    assert path == str(fallback / "echo.pid")
    info = os.lstat(fallback)
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.geteuid())


def test_a_directory_others_may_write_to_is_refused(no_run_dir, tmp_path):
    fallback = tmp_path / f"prefork-{os.geteuid()}"
    fallback.mkdir()
    fallback.chmod(0o777)  # someone else could put a pidfile naming any process there
    with pytest.raises(ConfigError, match=rf"no directory for the default pidfile .*{fallback}: not a directory "
                                          r"of this user's that only it may write to.*give --pidfile FILE"):
        runpaths.default_pidfile("echo", no_run_dir)


def test_xdg_runtime_dir_comes_before_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: /run/prefork is root's
    dirs = runpaths.candidate_dirs({"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert dirs == ["/run/user/1000/prefork", os.path.join(tempfile.gettempdir(), "prefork-1000")]
    assert runpaths.candidate_dirs({"RUNTIME_DIRECTORY": "/run/svc:/run/other"}) == ["/run/svc"]


@pytest.mark.parametrize("name, file", [("echo", "echo.pid"), ("my svc/../x", "my_svc_.._x.pid"),
                                        ("...", "prefork.pid"), ("a@b", "a_b.pid")])
def test_service_names_become_safe_file_names(tmp_path, name, file):
    assert runpaths.default_pidfile(name, {"RUNTIME_DIRECTORY": str(tmp_path)}) == str(tmp_path / file)


def test_service_names_of_app_strings():
    assert [runpaths.service_name(app) for app in ("workers.echo", "m:App", "a.b:C.D")] == ["echo", "App", "D"]
