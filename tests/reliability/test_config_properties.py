"""Properties of the configuration parser (prefork.config, prefork.setting_types).

- Every valid value of every setting gives the same Settings whether it is written in a TOML
  config file (as prefork writes it: ``format_value``, which print-config and the example file
  use), in the environment or on the command line, in any of the spellings the README accepts
  (``yes``/``on``/``1``, ``660``/``0o660``, ``512M``/``536870912``, ...). Several settings given
  together give the same Settings from every source, or the same refusal.
- Arbitrary junk, for any setting and from any source, is accepted as a valid value or refused
  with a ConfigError (exit code 2) that names the setting: never another exception, which the
  CLI would show as a traceback with exit code 1. Unknown names are refused naming the name.

The values are checked in-process through ``config.load`` (the CLI's own path, including its
argument parser); tests/reliability/test_bad_input.py checks what the user sees of the errors.
"""

from __future__ import annotations

import datetime
import math
import string
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from prefork import config
from prefork.config import MAX_SECONDS, MAX_WORKERS, Option, Settings, format_value, load
from prefork.errors import ConfigError
from prefork.setting_types import (
    ADDRESS,
    BOOL,
    FLOAT,
    HOOK,
    INT,
    MODE,
    NAME_OR_ID,
    OPTIONAL_TEXT,
    SIZE,
    TEXT,
    TEXT_LIST,
    WORD,
)

pytestmark = pytest.mark.reliability

# Examples per setting and per property: enough to meet every spelling, bounded in time.
EXAMPLES = 40
# Allowed ranges of the integer settings (README's table; the upper bounds of the unbounded
# ones are large values a user might type, not limits).
INT_RANGES = {
    "backlog": (0, 2**62), "workers": (0, MAX_WORKERS), "threads": (1, 2**20),
    "max_workers": (0, MAX_WORKERS), "min_workers": (1, MAX_WORKERS), "min_spare": (0, 2**20),
    "max_spare": (1, 2**20), "max_requests": (0, 2**62), "max_requests_jitter": (0, 2**62),
    "crash_limit": (0, 2**62), "max_request_line": (1, 2**20), "max_header_count": (1, 2**20),
}
# The least value of a size setting, where it is not 0.
SIZE_MINIMUM = {"max_header_bytes": 1}
CHOICES = {"mode": ("sync", "thread", "fork", "asyncio"), "loop": ("auto", "asyncio", "uvloop"), "loglevel": ("debug", "info", "warning", "error", "critical"),
           "log_format": ("text", "json"), "cert_reqs": ("none", "optional", "required"),
           "tls_min_version": ("tlsv1.2", "tlsv1.3")}
# Lists that are not bind specs: networks in canonical CIDR form, and ALPN protocol names.
_CANONICAL_NETWORKS = ("10.0.0.0/8", "127.0.0.1/32", "192.0.2.0/24", "::1/128", "2001:db8::/32")  # sorted as canonical
_NETWORKS = st.lists(st.integers(0, len(_CANONICAL_NETWORKS) - 1), min_size=1, max_size=4, unique=True).map(
    lambda picks: [_CANONICAL_NETWORKS[i] for i in sorted(picks)])
_OTHER_LISTS = {"proxy_allow_ips": _NETWORKS, "forwarded_allow_ips": _NETWORKS}
_TRUE, _FALSE = ("true", "yes", "on", "1", "True", "YES"), ("false", "no", "off", "0", "False", "Off")
# Memory units and their factors, as the README's table spells them.
SIZE_UNITS = {"": 1, "B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "K": 2**10, "M": 2**20, "G": 2**30,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}

OPTIONS = {option.name: option for option in config.options()}


# -- valid values of each setting, and the ways to write them --------------------------------------

# Text a user can put in a file, a variable or an argument: no NUL, no lone surrogates; the
# characters TOML, shells and argparse treat specially come up often.
_TEXT = st.text(st.one_of(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                          st.sampled_from("\x7f\x1b\t\n\r\"\\'#=,-[]{}\u00e4\u20ac\U0001f600")), max_size=40)
# Names of users, paths, module names: what an environment list item or a stripped value keeps.
_WORD = st.text(string.ascii_letters + string.digits + "_-./", min_size=1, max_size=20)
_HOST = st.sampled_from(["127.0.0.1", "0.0.0.0", "[::1]", "[::]", "localhost", "example.com"])
_PORT = st.integers(0, 65535)


def _bind_spec() -> st.SearchStrategy[str]:
    inet = st.builds(lambda scheme, host, port: f"{scheme}{host}:{port}", st.sampled_from(["tcp://", "udp://", ""]),
                     _HOST, _PORT)
    unix = st.builds(lambda kind, path: f"{kind}:/{path}", st.sampled_from(["unix", "unix-dgram"]), _WORD)
    systemd = st.one_of(st.just("systemd"), st.builds("systemd:{}".format, _WORD))
    return st.one_of(inet, unix, systemd, st.builds("fd://{}".format, st.integers(0, 1000)))


def _name() -> st.SearchStrategy[str | int | None]:
    """A user or group: an id, a name (not all ASCII digits, which would read as an id), or none."""
    names = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc"), blacklist_characters=","),
                    min_size=1, max_size=20).filter(lambda t: t == t.strip() and not (t.isascii() and t.isdigit()))
    return st.one_of(st.none(), st.integers(0, 2**32 - 2), names)  # (uid_t)-1 is no id


def valid_values(option: Option) -> st.SearchStrategy[Any]:
    """Values *option* accepts, as Settings holds them."""
    kind, name = option.kind, option.name
    if kind is INT:
        low, high = INT_RANGES[name]
        return st.integers(low, high)
    if kind is FLOAT:
        return st.one_of(st.floats(0, MAX_SECONDS, allow_nan=False), st.integers(0, 10**6).map(float))
    if kind is BOOL:
        return st.booleans()
    if kind is WORD:
        return st.sampled_from(CHOICES[name])
    if kind is TEXT:
        return _TEXT if name == "name" else st.one_of(st.just("-"), _WORD)
    if kind is OPTIONAL_TEXT:
        return st.one_of(st.none(), st.just("-"), _WORD)
    if kind is TEXT_LIST:
        if name == "alpn_protocols":
            return st.lists(_WORD.filter(lambda w: "," not in w), min_size=1, max_size=3)
        return _OTHER_LISTS[name] if name in _OTHER_LISTS else st.lists(_bind_spec(), max_size=4)
    if kind is NAME_OR_ID:
        return _name()
    if kind is MODE:
        return st.one_of(st.none(), st.integers(0, 0o7777))
    if kind is SIZE:
        return st.builds(lambda n, unit: n * SIZE_UNITS[unit], st.integers(SIZE_MINIMUM.get(name, 0), 2**40),
                         st.sampled_from(list(SIZE_UNITS)))
    if kind is ADDRESS:
        return st.one_of(st.none(), st.builds(lambda host, port: f"tcp://{host}:{port}", _HOST, _PORT))
    if kind is HOOK:
        return st.one_of(st.none(), st.builds("{}:{}".format, _WORD, _WORD))
    raise AssertionError(f"no strategy for setting {name!r} of kind {kind.allowed!r}: add one")


def text_forms(option: Option, value: Any) -> list[str]:
    """The ways to write *value* in the environment (and after a flag): all mean the same."""
    kind = option.kind
    if value is None:
        return [""]  # an empty value unsets an optional setting
    if kind is INT:
        return [str(value), f" {value} ", f"+{value}"]
    if kind is FLOAT:
        return [repr(value), f" {value!r}"] + ([str(int(value))] if value.is_integer() else [])
    if kind is BOOL:
        return list(_TRUE if value else _FALSE)
    if kind is WORD:
        return [value, value.upper(), f" {value.capitalize()} "]
    if kind is TEXT_LIST:
        return [",".join(value), ", ".join(value)]
    if kind is NAME_OR_ID:
        return [str(value), f" {value} "] if isinstance(value, int) else [value]
    if kind is MODE:
        return [f"{value:o}", f"0o{value:o}", f"0O{value:04o}"]
    if kind is SIZE:
        return [str(value), f"{value} B"] + [f"{value // factor}{unit}" for unit, factor in SIZE_UNITS.items()
                                             if unit and value % factor == 0]
    return [value]


def cli_args(option: Option, value: Any, text: str) -> list[str]:
    if option.kind is BOOL:
        return [option.flag if value else "--no-" + option.flag[2:]]
    if option.kind is TEXT_LIST:
        return [f"{option.flag}={item}" for item in value]
    return [f"{option.flag}={text}"]


def toml_line(option: Option, value: Any) -> str:
    """*value* as prefork writes it in TOML; a None is left out (unset is the default)."""
    return "" if value is None else f"{option.name} = {format_value(option.name, value)}\n"


# -- the three sources --------------------------------------------------------------------------------


def outcome(make: Callable[[], Any]) -> Any:
    """The Settings *make* returns, or the message of the ConfigError it raises."""
    try:
        return make()
    except ConfigError as exc:
        return f"ConfigError: {exc}"


def from_toml(path: Path, text: str) -> Any:
    path.write_text(text, encoding="utf-8")
    return outcome(lambda: load(["-c", str(path)], {}, path.parent)[0])


def from_env(environ: dict[str, str]) -> Any:
    return outcome(lambda: load([], environ, "/nonexistent")[0])


def from_cli(argv: list[str]) -> Any:
    return outcome(lambda: load(argv, {}, "/nonexistent")[0])


def test_every_setting_has_a_strategy() -> None:
    for option in OPTIONS.values():
        valid_values(option)  # raises for a setting added without one


@pytest.mark.parametrize("name", list(OPTIONS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_valid_value_is_the_same_setting_from_toml_env_and_cli(tmp_path: Path, name: str, data: Any) -> None:
    option = OPTIONS[name]
    value = data.draw(valid_values(option), label="value")
    text = data.draw(st.sampled_from(text_forms(option, value)), label="text")
    expected = Settings(**{name: value})
    assert from_toml(tmp_path / "prefork.toml", toml_line(option, value)) == expected
    assert from_env({option.env: text}) == expected
    assert from_cli(cli_args(option, value, text)) == expected


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_several_settings_give_the_same_outcome_from_every_source(tmp_path: Path, data: Any) -> None:
    names = data.draw(st.lists(st.sampled_from(list(OPTIONS)), unique=True, min_size=1, max_size=10), label="names")
    values = {name: data.draw(valid_values(OPTIONS[name]), label=name) for name in names}
    texts = {name: data.draw(st.sampled_from(text_forms(OPTIONS[name], value))) for name, value in values.items()}
    expected = outcome(lambda: Settings(**values))  # a relation (max_workers >= min_workers) may refuse
    document = "".join(toml_line(OPTIONS[name], value) for name, value in values.items())
    argv = [arg for name, value in values.items() for arg in cli_args(OPTIONS[name], value, texts[name])]
    assert from_toml(tmp_path / "prefork.toml", document) == expected
    assert from_env({OPTIONS[name].env: text for name, text in texts.items()}) == expected
    assert from_cli(argv) == expected


# -- junk -----------------------------------------------------------------------------------------------

JUNK_TEXT = st.one_of(
    _TEXT,
    st.from_regex(r"\A[+-]?[0-9]{1,400}(\.[0-9]{0,5})?([eE][+-]?[0-9]{1,4})?\s?[a-zA-Z]{0,4}\Z"),
    st.sampled_from(["", " ", "inf", "-inf", "nan", "1e999", "-0", "0o7777", "0o10000", "9" * 5000, "\u0663",
                     "1_000", "0x10", "true", ",", ",,", "tcp://", "::", "-", "--", "=", ":", "0.5", "1e9", "1e10"]),
)


def _toml_string(text: str) -> str:
    escaped = "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    return f'"{escaped}"'


def _toml(value: Any) -> str:
    """*value* in TOML (any value tomllib can return)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{_toml_string(k)} = {_toml(v)}" for k, v in value.items()) + "}"


JUNK_TOML = st.recursive(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), _TEXT, st.datetimes(),
              st.dates(), st.times(), JUNK_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=3)),
    max_leaves=8,
)


def assert_accepted_or_names(result: Any, option: Option) -> None:
    if isinstance(result, str):
        assert result.startswith(f"ConfigError: setting {option.name!r}"), result


@pytest.mark.parametrize("name", list(OPTIONS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=JUNK_TEXT, toml_value=JUNK_TOML)
def test_junk_is_accepted_or_refused_naming_the_setting(tmp_path: Path, name: str, text: str,
                                                        toml_value: Any) -> None:
    option = OPTIONS[name]
    assert_accepted_or_names(from_env({option.env: text}), option)
    assert_accepted_or_names(from_cli([f"{option.flag}={text}"]), option)
    assert_accepted_or_names(from_toml(tmp_path / "prefork.toml", f"{name} = {_toml(toml_value)}\n"), option)


_UNKNOWN = st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z").filter(lambda key: key not in OPTIONS)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_UNKNOWN)
def test_unknown_names_are_refused_naming_them(tmp_path: Path, key: str) -> None:
    variable, flag = f"PREFORK_{key.upper()}", "--" + key.replace("_", "-")
    assert from_toml(tmp_path / "prefork.toml", f"{key} = 1\n").startswith(
        f"ConfigError: config file {tmp_path / 'prefork.toml'}: unknown setting {key!r}")
    if variable not in config.RESERVED_ENV:
        assert from_env({variable: "1"}).startswith(f"ConfigError: unknown environment variable {variable}")
    if flag not in config.value_flags():  # --no-preload and the like are flags, not settings
        assert from_cli([flag, "1"]).startswith(f"ConfigError: unknown option {flag!r}")


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=300), _TEXT.map(str.encode)))
def test_a_config_file_of_junk_is_refused_as_such(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "prefork.toml"
    path.write_bytes(content)
    result = outcome(lambda: load(["-c", str(path)], {}, tmp_path)[0])
    assert isinstance(result, Settings) or result.startswith(("ConfigError: config file ", "ConfigError: setting ")), \
        result


# -- the bugs these properties found, as examples -------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--max-worker-memory", "9" * 400], None),  # was OverflowError: a traceback and exit 1
    (["--read-timeout", "1e300"], "expected a number from 0 to 1e+09"),  # was accepted: every connection failed
    (["--timeout", "1e999"], "expected a number"),  # was accepted as inf (TOML refused it)
    (["--workers", str(MAX_WORKERS + 1)], f"expected an integer from 0 to {MAX_WORKERS}"),  # never got ready
])
def test_values_that_crashed_hung_or_were_half_accepted_are_handled(argv: list[str], message: str | None) -> None:
    result = from_cli(argv)
    if message is None:
        assert isinstance(result, Settings) and result.max_worker_memory == int("9" * 400)
    else:
        assert isinstance(result, str) and message in result


def test_text_with_del_is_written_as_valid_toml(tmp_path: Path) -> None:
    assert from_toml(tmp_path / "p.toml", toml_line(OPTIONS["name"], "a\x7fb")) == Settings(name="a\x7fb")


def test_max_workers_leaves_the_scoreboard_a_slot_for_a_successor() -> None:
    from prefork.arbiter import SCOREBOARD_CAPACITY
    from prefork.control import MAX_WORKERS as SCALE_LIMIT

    assert MAX_WORKERS == SCALE_LIMIT == SCOREBOARD_CAPACITY - 1
