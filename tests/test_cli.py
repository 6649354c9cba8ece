"""The prefork command in-process: argument splitting, config commands, and every usage error
that is caught before a master starts (the ones that need a master are in tests/integration)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefork import cli, control
from prefork.cli import main, split_run_args
from prefork.errors import EXIT_APP_LOAD, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, with no PREFORK_* variables and sys.path restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [n for n in os.environ if n.startswith("PREFORK_")]:
        monkeypatch.delenv(name)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the entry points ----------------------------------------------------------------------------


def test_console_script_and_python_m_run_main():
    scripts = importlib.metadata.entry_points(group="console_scripts", name="prefork")
    assert [entry.value for entry in scripts] == ["prefork.cli:main"]
    done = subprocess.run([sys.executable, "-m", "prefork", "--version"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert (done.returncode, done.stdout.strip()) == (0, "prefork 0.1.0")


def test_no_command_is_a_usage_error(capsys, in_tmp):
    code, _, err = run(capsys)
    assert code == EXIT_USAGE and "a command is required: run, status" in err


def test_unknown_command_suggests_the_closest(capsys, in_tmp):
    code, _, err = run(capsys, "stauts")
    assert code == EXIT_USAGE and "unknown command 'stauts'; did you mean 'status'?" in err


def test_help_of_run_lists_every_setting_flag(capsys, in_tmp):
    code, out, _ = run(capsys, "run", "--help")
    assert code == EXIT_OK and "prefork run [options] APP" in out
    for option in cli.config.options():
        assert option.flag in out
    assert "--no-preload" in out and "PREFORK_MAX_REQUESTS" in out


# -- splitting `prefork run` ---------------------------------------------------------------------


def test_split_settings_before_and_after_app_and_service_options():
    args = split_run_args(["-w4", "--bind", "tcp://127.0.0.1:0", "workers.http", "--mode=thread",
                           "--root", "/srv", "--doc-index", "--threads", "8", "--verbose"])
    assert args.app == "workers.http"
    assert args.settings_argv == ["-w4", "--bind", "tcp://127.0.0.1:0", "--mode=thread", "--threads", "8"]
    assert args.service_options == {"root": "/srv", "doc_index": True, "verbose": True}


def test_split_after_double_dash_everything_is_a_service_option():
    args = split_run_args(["--preload", "app:Handler", "--", "--workers", "3", "--name=x"])
    assert (args.settings_argv, args.service_options) == (["--preload"], {"workers": "3", "name": "x"})


@pytest.mark.parametrize("argv, message", [
    (["--wrkers", "2", "app"], "unknown option '--wrkers'; did you mean '--workers'?"),
    (["app", "--max-request", "2"], "unknown option '--max-request'; did you mean '--max-requests'?"),
    (["app", "other"], "unexpected argument 'other' after APP 'app'"),
    (["app", "-x"], "unknown option '-x': service options are written --NAME VALUE"),
    (["app", "--workers"], "option --workers expects a value"),
])
def test_split_errors(argv, message):
    with pytest.raises(ConfigError) as caught:
        split_run_args(argv)
    assert message in str(caught.value)


# -- `prefork run` errors caught before a master starts -----------------------------------------


@pytest.mark.parametrize("argv, code, message", [
    (["run"], EXIT_USAGE, "prefork run: APP is missing; APP is module:HandlerClass"),
    (["run", "not an app"], EXIT_USAGE, "APP 'not an app' is not a module or module:attribute"),
    (["run", "no_such_module_xyz:Handler"], EXIT_APP_LOAD,
     "cannot load 'no_such_module_xyz:Handler': no module named 'no_such_module_xyz'"),
    (["run", "workers.no_such_service"], EXIT_APP_LOAD, "no module named 'workers.no_such_service'"),
    (["run", "--wsgi", "no_such_wsgi_app:app"], EXIT_APP_LOAD, "no module named 'no_such_wsgi_app'"),
    (["run", "workers.echo", "--workerz", "2"], EXIT_USAGE, "did you mean '--workers'?"),
    (["run", "workers.echo", "-b", "tcp://127.0.0.1"], EXIT_USAGE, "bind spec 'tcp://127.0.0.1'"),
    (["run", "workers.echo", "-c", "missing.toml"], EXIT_USAGE, "config file {tmp}/missing.toml: not found"),
    (["run", "--wsgi", "app:x", "--", "--app", "y"], EXIT_USAGE, "--app cannot be combined with --wsgi"),
])
def test_run_usage_errors_exit_with_one_line_and_no_traceback(capsys, in_tmp, argv, code, message):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert err.startswith("prefork: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(tmp=in_tmp) in err


def test_run_reports_a_bad_environment_variable(capsys, in_tmp, monkeypatch):
    monkeypatch.setenv("PREFORK_WORKERS", "all")
    code, _, err = run(capsys, "run", "workers.echo")
    assert code == EXIT_USAGE
    assert "setting 'workers': 'all' is not allowed; expected an integer (environment variable PREFORK_WORKERS)" in err


def test_default_bind_is_read_from_the_source_without_importing(in_tmp):
    (in_tmp / "svc_literal.py").write_text("import sys\nDEFAULT_BIND = ['udp://127.0.0.1:0']\n"
                                           "raise SystemExit('imported')\n")
    (in_tmp / "svc_single.py").write_text("DEFAULT_BIND: str = 'tcp://127.0.0.1:1'\n")
    (in_tmp / "svc_computed.py").write_text("PORT = 1\nDEFAULT_BIND = [f'tcp://127.0.0.1:{PORT}']\n")
    cli._add_import_path(str(in_tmp))
    assert cli._default_bind("svc_literal:Handler") == ["udp://127.0.0.1:0"]
    assert "svc_literal" not in sys.modules
    assert cli._default_bind("svc_single") == ["tcp://127.0.0.1:1"]
    assert cli._default_bind("svc_computed") == ["tcp://127.0.0.1:8000"]
    import workers.echo as echo  # noqa: E402 (after the checks above, which must not import it)

    assert cli._default_bind("workers.echo") == echo.DEFAULT_BIND


# -- check-config and print-config ----------------------------------------------------------------


def test_check_config_ok_and_wrong(capsys, in_tmp):
    (in_tmp / "good.toml").write_text("workers = 2\n")
    (in_tmp / "bad.toml").write_text("workers = 2\ntimeout = -1\n")
    assert run(capsys, "check-config", "-c", "good.toml") == (EXIT_OK, "configuration OK\n", "")
    code, out, err = run(capsys, "check-config", "-c", "bad.toml")
    assert (code, out) == (EXIT_USAGE, "")
    assert f"setting 'timeout': -1 is not allowed; expected a number >= 0 (in {in_tmp / 'bad.toml'})" in err


def test_check_config_of_the_example_file(capsys, in_tmp):
    assert run(capsys, "check-config", "-c", str(ROOT / "deploy" / "prefork.toml"))[0] == EXIT_OK


def test_print_config_shows_each_value_and_its_source(capsys, in_tmp, monkeypatch):
    (in_tmp / "pyproject.toml").write_text("[tool.prefork]\nworkers = 2\nthreads = 3\nbacklog = 4\n")
    monkeypatch.setenv("PREFORK_THREADS", "5")
    monkeypatch.setenv("PREFORK_BACKLOG", "6")
    code, out, _ = run(capsys, "print-config", "--json", "--backlog", "7")
    shown = json.loads(out)
    assert code == EXIT_OK and set(shown) == {option.name for option in cli.config.options()}
    assert [(shown[n]["value"], shown[n]["source"]) for n in ("mode", "workers", "threads", "backlog")] == [
        ("sync", "default"), (2, f"file {in_tmp / 'pyproject.toml'} [tool.prefork]"),
        (5, "env PREFORK_THREADS"), (7, "command line")]
    code, out, _ = run(capsys, "print-config", "--backlog", "7")
    assert code == EXIT_OK and any(line.split() == ["backlog", "7", "command", "line"] for line in out.splitlines())


# -- control commands without a master ------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["reload"], ["stop"], ["upgrade"], ["scale", "2"],
                                     ["reopen-logs"]])
def test_control_commands_name_the_pidfile_when_no_master_runs(capsys, in_tmp, command):
    code, _, err = run(capsys, *command, "--pidfile", "master.pid")
    assert code == EXIT_FAILURE
    assert f"no master running: {in_tmp / 'master.pid'} does not exist" in err


def test_a_stale_pidfile_is_reported_as_such(capsys, in_tmp):
    (in_tmp / "stale.pid").write_text("4194304\n")  # Linux pids stay below pid_max, at most 2**22
    code, _, err = run(capsys, "status", "-p", "stale.pid", "--json")
    assert code == EXIT_FAILURE and "names pid 4194304, which is not running (stale pidfile)" in err


def test_control_commands_without_a_pidfile_and_no_master_name_the_flag(capsys, in_tmp, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(in_tmp))  # where default pidfiles are: none here
    code, _, err = run(capsys, "reload")
    assert code == EXIT_FAILURE and f"no master running: no live pidfile in {in_tmp}" in err
    assert "give --pidfile FILE" in err and "PREFORK_PIDFILE" in err


def test_the_pidfile_setting_is_found_in_the_config_sources(capsys, in_tmp, monkeypatch):
    monkeypatch.setenv("PREFORK_PIDFILE", str(in_tmp / "from-env.pid"))
    assert f"{in_tmp / 'from-env.pid'} does not exist" in run(capsys, "status")[2]
    (in_tmp / "p.toml").write_text('pidfile = "from-file.pid"\n')
    monkeypatch.delenv("PREFORK_PIDFILE")
    assert f"{in_tmp / 'from-file.pid'} does not exist" in run(capsys, "stop", "-c", "p.toml")[2]


@pytest.mark.parametrize("count, message", [
    ("two", "scale: 'two' is not allowed; expected N, +N or -N"),
    ("+", "scale: '+' is not allowed"),
])
def test_scale_checks_its_argument_before_looking_for_a_master(capsys, in_tmp, count, message):
    code, _, err = run(capsys, "scale", count, "-p", "none.pid")
    assert code == EXIT_USAGE and message in err


@pytest.mark.parametrize("text, current, desired", [("3", 1, 3), ("+2", 2, 4), ("-1", 3, 2)])
def test_scale_targets(text, current, desired):
    assert control._scale_target(text, control._parse_scale(text), current) == desired


@pytest.mark.parametrize("text, current", [("-2", 2), ("0", 4), ("+2000", 1)])
def test_scale_refuses_to_leave_no_worker_or_too_many(text, current):
    with pytest.raises(ConfigError, match=re.escape(f"scale: '{text}' would make")):
        control._scale_target(text, control._parse_scale(text), current)
