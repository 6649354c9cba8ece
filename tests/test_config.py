"""prefork.config: one declaration per setting, its parsers, the sources and the generated files."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from prefork import config, settings_docs
from prefork.config import load, make_settings, options
from prefork.errors import BindSpecError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def by_name(name: str) -> config.Option:
    return next(option for option in options() if option.name == name)


# -- the declaration -----------------------------------------------------------------------------


def test_every_setting_has_help_a_parser_and_derived_names():
    for option in options():
        assert option.help and option.kind is not None, option.name
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "PREFORK_" + option.name.upper()
        if option.default is None and option.default_text is None and option.deploy is None:
            assert option.sample is not None, f"{option.name}: unset by default, needs a sample"


def test_settings_the_log_and_metrics_engineers_read_exist_with_their_defaults():
    settings = make_settings({})
    assert (settings.loglevel, settings.error_log, settings.access_log, settings.log_format) == ("info", "-", None, "text")
    assert (settings.metrics_bind, settings.read_timeout, settings.wsgi) == (None, 0.0, False)


@pytest.mark.parametrize("option", options(), ids=lambda o: o.name)
def test_defaults_and_samples_survive_a_toml_round_trip(option):
    for value in (option.default, option.sample, option.deploy):
        if value is None or option.default_text and value is option.default:
            continue
        text = f"key = {option.kind.to_toml(value)}"
        assert option.kind.from_toml(tomllib.loads(text)["key"]) == value, text


def test_make_settings_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="unknown setting 'worker'; did you mean 'workers'"):
        make_settings({"worker": 2})


def test_relations_between_settings_are_checked():
    with pytest.raises(ConfigError, match="max_workers.*below min_workers"):
        load(["--max-workers", "2", "--min-workers", "3"], {}, "/nonexistent")


# -- parsing text (environment and flags) --------------------------------------------------------


@pytest.mark.parametrize("name, text, value", [
    ("workers", "4", 4),
    ("timeout", "2.5", 2.5),
    ("timeout", "3", 3.0),
    ("preload", "yes", True),
    ("preload", "Off", False),
    ("unix_mode", "0o660", 0o660),
    ("unix_mode", "660", 0o660),
    ("umask", "0027", 0o027),
    ("umask", "", None),
    ("max_worker_memory", "200MB", 200_000_000),
    ("max_worker_memory", "1.5GiB", int(1.5 * 2**30)),
    ("max_worker_memory", "512M", 512 * 2**20),
    ("max_worker_memory", "4096", 4096),
    ("user", "33", 33),
    ("user", "www-data", "www-data"),
    ("pidfile", "", None),
    ("bind", "tcp://127.0.0.1:1, udp://127.0.0.1:2", ["tcp://127.0.0.1:1", "udp://127.0.0.1:2"]),
    ("mode", "THREAD", "thread"),
    ("when_ready", "pkg.hooks:ready", "pkg.hooks:ready"),
])
def test_environment_values_are_parsed_by_type(name, text, value):
    settings, sources = load([], {f"PREFORK_{name.upper()}": text}, "/nonexistent")
    assert getattr(settings, name) == value
    assert sources[name] == f"env PREFORK_{name.upper()}"


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["", "B", "KiB", "kB", "M", "GiB"]))
def test_sizes_scale_by_their_unit(number, unit):
    factor = {"": 1, "B": 1, "KiB": 1024, "kB": 1000, "M": 2**20, "GiB": 2**30}[unit]
    assert by_name("max_worker_memory").kind.from_text(f"{number}{unit}") == number * factor


@pytest.mark.parametrize("argv, expected", [
    (["--workers", "many"], "setting 'workers': 'many' is not allowed; expected an integer (command line --workers)"),
    (["-w", "-1"], "setting 'workers': '-1' is not allowed; expected an integer >= 0 (command line --workers)"),
    (["--timeout", "soon"], "setting 'timeout': 'soon' is not allowed; expected a number"),
    (["--mode", "threads"], "setting 'mode': 'threads' is not allowed; expected one of: sync, thread, fork"),
    (["--unix-mode", "0o999"], "setting 'unix_mode': '0o999' is not allowed; expected an octal mode"),
    (["--umask", "0o17777"], "setting 'umask': '0o17777' is not allowed; expected an octal mode"),
    (["--max-worker-memory", "12 parsecs"], "setting 'max_worker_memory': '12 parsecs' is not allowed; expected a size"),
    (["--metrics-bind", "udp://127.0.0.1:9100"], "setting 'metrics_bind': 'udp://127.0.0.1:9100' is not allowed; expected tcp://HOST:PORT"),
    (["--log-format", "xml"], "setting 'log_format': 'xml' is not allowed; expected one of: text, json"),
    (["--on-exit", "nocolon"], "setting 'on_exit': 'nocolon' is not allowed; expected a callable or 'module:function'"),
    (["--error-log", ""], "setting 'error_log': '' is not allowed; expected \"-\" (stderr) or a file path"),
])
def test_a_wrong_flag_value_names_setting_value_what_is_allowed_and_where(argv, expected):
    with pytest.raises(ConfigError) as caught:
        load(argv, {}, "/nonexistent")
    assert expected in str(caught.value)


def test_a_bad_bind_spec_names_the_spec_and_the_accepted_forms():
    with pytest.raises(BindSpecError) as caught:
        load(["--bind", "tcp://127.0.0.1:99999"], {}, "/nonexistent")
    message = str(caught.value)
    assert "'tcp://127.0.0.1:99999'" in message and "accepted forms" in message and "--bind" in message


def test_a_wrong_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"'threads': 'lots' is not allowed; expected an integer "
                                          r"\(environment variable PREFORK_THREADS\)"):
        load([], {"PREFORK_THREADS": "lots"}, "/nonexistent")


@pytest.mark.parametrize("argv, message", [
    (["--workerz", "2"], "unknown option '--workerz'; did you mean '--workers'?"),
    (["--max-request=5"], "unknown option '--max-request'; did you mean '--max-requests'?"),
    (["--no-preloadd"], "unknown option '--no-preloadd'; did you mean '--no-preload'?"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_unknown_flags_suggest_the_closest(argv, message):
    with pytest.raises(ConfigError) as caught:
        load(argv, {}, "/nonexistent")
    assert str(caught.value) == message


def test_unknown_environment_variable_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown environment variable PREFORK_WORKER; did you mean PREFORK_WORKERS"):
        load([], {"PREFORK_WORKER": "2"}, "/nonexistent")


def test_prefork_own_variables_of_an_upgrade_are_not_settings():
    from prefork.arbiter import UPGRADE_PARENT_ENV
    from prefork.listeners import inherit_env

    assert UPGRADE_PARENT_ENV in config.RESERVED_ENV
    assert set(inherit_env([])) <= config.RESERVED_ENV
    environ = {name: "1" for name in config.RESERVED_ENV}
    assert load([], environ, "/nonexistent")[1] == {o.name: "default" for o in options()}


# -- config files --------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_values_are_typed_by_toml(tmp_path):
    write(tmp_path / "p.toml", 'unix_mode = 0o660\nmax_worker_memory = "1.5GiB"\ntimeout = 5\n'
                               'bind = "unix:/tmp/x.sock"\nuser = 33\n')
    settings, sources = load(["-c", "p.toml"], {}, tmp_path)
    assert (settings.unix_mode, settings.max_worker_memory, settings.timeout) == (0o660, int(1.5 * 2**30), 5.0)
    assert (settings.bind, settings.user) == (["unix:/tmp/x.sock"], 33)
    assert sources["timeout"] == f"file {tmp_path / 'p.toml'}"


@pytest.mark.parametrize("text, message", [
    ("workerz = 2\n", "unknown setting 'workerz'; did you mean 'workers'?"),
    ("workers = true\n", "setting 'workers': True is not allowed; expected an integer (in "),
    ("workers = 2.5\n", "setting 'workers': 2.5 is not allowed; expected an integer (in "),
    ("preload = 'yes'\n", "setting 'preload': 'yes' is not allowed; expected true or false (in "),
    ("bind = [1, 2]\n", "setting 'bind': [1, 2] is not allowed; expected a list of text"),
    ("workers = \n", "not valid TOML"),
])
def test_config_file_errors_name_the_file_the_key_and_the_value(tmp_path, text, message):
    path = write(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError) as caught:
        load(["-c", str(path)], {}, tmp_path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'none.toml'}: not found"):
        load(["-c", "none.toml"], {}, tmp_path)


def test_pyproject_tool_table_is_read_when_no_file_is_given(tmp_path):
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n[tool.prefork]\nworkers = 3\n')
    settings, sources = load([], {}, tmp_path)
    assert settings.workers == 3
    assert sources["workers"] == f"file {tmp_path / 'pyproject.toml'} [tool.prefork]"
    write(tmp_path / "other.toml", "threads = 2\n")
    settings, sources = load(["-c", "other.toml"], {}, tmp_path)  # -c replaces pyproject.toml
    assert (settings.workers, settings.threads, sources["workers"]) == (make_settings({}).workers, 2, "default")


def test_pyproject_without_a_prefork_table_sets_nothing(tmp_path):
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    assert set(load([], {}, tmp_path)[1].values()) == {"default"}


def test_precedence_default_file_environment_command_line(tmp_path):
    write(tmp_path / "p.toml", "workers = 2\nthreads = 3\nbacklog = 4\n")
    environ = {"PREFORK_THREADS": "5", "PREFORK_BACKLOG": "6"}
    settings, sources = load(["-c", "p.toml", "--backlog", "7"], environ, tmp_path)
    assert (settings.mode, settings.workers, settings.threads, settings.backlog) == ("sync", 2, 5, 7)
    assert [sources[n] for n in ("mode", "workers", "threads", "backlog")] == [
        "default", f"file {tmp_path / 'p.toml'}", "env PREFORK_THREADS", "command line"]


def test_bind_on_the_command_line_replaces_the_file_list(tmp_path):
    write(tmp_path / "p.toml", 'bind = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]\n')
    settings, _ = load(["-c", "p.toml", "-b", "udp://127.0.0.1:3", "--bind", "unix:/tmp/a,b.sock"], {}, tmp_path)
    assert settings.bind == ["udp://127.0.0.1:3", "unix:/tmp/a,b.sock"]


# -- generated files -----------------------------------------------------------------------------


def test_generated_readme_table_and_example_config_are_up_to_date():
    stale = settings_docs.write_generated(ROOT, check=True)
    assert not stale, f"stale generated files {stale}: run `prefork generate` (python -m prefork generate)"


def test_write_generated_rewrites_a_stale_copy(tmp_path):
    readme = write(tmp_path / "README.md", f"intro\n{config.TABLE_START}\nold\n{config.TABLE_END}\nrest\n")
    assert settings_docs.write_generated(tmp_path) == [readme, tmp_path / "deploy" / "prefork.toml"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{config.TABLE_END}\nrest\n") and "old" not in text
    assert settings_docs.write_generated(tmp_path, check=True) == []


def test_the_table_has_a_row_per_setting():
    rows = [line for line in settings_docs.settings_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [option.name for option in options()]


def test_example_config_lists_every_key_and_loads_to_the_defaults(tmp_path):
    text = (ROOT / "deploy" / "prefork.toml").read_text()
    for option in options():
        assert f"\n{option.name} = " in text or f"\n# {option.name}" in text, option.name
    uncommented = "\n".join(line.lstrip("# ") for line in text.splitlines()
                            if line.startswith("# ") and " = " in line and "default: unset" not in line)
    defaults = tomllib.loads(uncommented)
    for key, value in defaults.items():
        assert by_name(key).kind.from_toml(value) == by_name(key).default, key
    settings, sources = load(["-c", str(ROOT / "deploy" / "prefork.toml")], {}, tmp_path)
    set_by_file = {name for name, source in sources.items() if source != "default"}
    assert set_by_file == {o.name for o in options() if o.deploy is not None}
    assert dataclasses.replace(settings, bind=[], pidfile=None) == make_settings({})
