"""The kinds of values settings take: how each is checked and read from text or TOML. Runs in: master.

prefork.config declares the settings with these validators and kinds; nothing here knows a
particular setting, except that messages name the one being checked.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import fractions
import json
import math
import os
import re
from typing import Any, Callable

from prefork.bindspec import parse_bind, parse_networks, split_bind_list
from prefork.errors import ConfigError

_Validator = Callable[[str, Any], Any]


# -- validators: (setting name, value) -> value, or ConfigError naming both -----------------------


class NotAllowed(ConfigError):
    """A value a validator refuses; ``expected`` says what would do."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"setting {name!r}: {value!r} is not allowed; expected {expected}")
        self.expected = expected


def _not_allowed(name: str, value: Any, expected: str) -> ConfigError:
    return NotAllowed(name, value, expected)


def check_at_least(minimum: float, maximum: float | None = None) -> _Validator:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
            raise _not_allowed(name, value, f"a number >= {minimum}")
        if maximum is not None and not value <= maximum:
            raise _not_allowed(name, value, f"a number from {minimum} to {maximum:g}")
        return value
    return check


def check_integer(minimum: int, maximum: int | None = None) -> _Validator:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _not_allowed(name, value, f"an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise _not_allowed(name, value, f"an integer from {minimum} to {maximum}")
        return value
    return check


def check_one_of(*choices: str) -> _Validator:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise _not_allowed(name, value, f"one of: {', '.join(choices)}")
        return value
    return check


def check_one_of_any_case(*choices: str) -> _Validator:
    """check_one_of for names written in any case (TLSv1.2, tlsv1.2); the value kept in lower case."""
    check = check_one_of(*choices)

    def lowered(name: str, value: Any) -> Any:
        return check(name, value.lower() if isinstance(value, str) else value)
    return lowered


def check_boolean(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _not_allowed(name, value, "true or false")
    return value


def check_text(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise _not_allowed(name, value, "text")
    return value


def check_path(name: str, value: Any) -> Any:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)  # a pathlib.Path through the Python API
    if not isinstance(value, str) or not value:
        raise _not_allowed(name, value, "a file path")
    return value


def check_path_or_dash(name: str, value: Any) -> Any:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _not_allowed(name, value, '"-" (stderr) or a file path')
    return os.fspath(value)


def check_optional(check: _Validator) -> _Validator:
    def optional(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)
    return optional


# User and group ids are 32-bit unsigned; (uid_t)-1 means "no change" to setuid(), never an id.
_MAX_ID = 2**32 - 2


def check_name_or_id(name: str, value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))
                              or (isinstance(value, int) and not 0 <= value <= _MAX_ID)):
        raise _not_allowed(name, value, f"a name, a number from 0 to {_MAX_ID} or nothing")
    return value


def check_mode(name: str, value: Any) -> Any:
    # Permission bits plus setuid, setgid and sticky: 0o7777 is the largest meaningful mode.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777):
        raise _not_allowed(name, value, "an octal mode from 0o000 to 0o7777, such as 0o660")
    return value


def check_hook(name: str, value: Any) -> Any:
    if value is not None and not callable(value) and not (isinstance(value, str) and ":" in value):
        raise _not_allowed(name, value, "a callable or 'module:function'")
    return value


def check_bind_list(name: str, value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _not_allowed(name, value, "a list of bind specs")
    for spec in value:
        parse_bind(spec)  # BindSpecError names the spec and the accepted forms
    return list(value)


def check_networks(name: str, value: Any) -> Any:
    """A list of networks in CIDR form, as ``?allow=`` takes them; ``*`` alone: any address."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _not_allowed(name, value, "a list of networks such as 10.0.0.0/8, or *")
    if list(value) == ["*"]:
        return ["*"]
    return [str(network) for network in parse_networks(value, f"setting {name!r}")]


def check_text_list(name: str, value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _not_allowed(name, value, "a list of names")
    return list(value)


def check_metrics_address(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("tcp://"):
        raise _not_allowed(name, value, "tcp://HOST:PORT or nothing")
    parse_bind(value)
    return value


# -- kinds: how a type of setting is read from text (environment, flags) and from TOML -----------


@dataclasses.dataclass(frozen=True)
class Kind:
    """Parsers and the printed form of one type of setting. Parsers raise ValueError."""

    allowed: str  # what a value may be, for messages and the settings table
    metavar: str  # the value's name in --help
    from_text: Callable[[str], Any]
    from_toml: Callable[[Any], Any]
    to_toml: Callable[[Any], str]


# ASCII digits only: int() and float() would also accept other scripts' digits.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_MODE_TEXT = re.compile(r"(0o)?([0-7]{1,4})", re.IGNORECASE)
_SIZE_TEXT = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", re.IGNORECASE)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
# Memory sizes: decimal units as disks and `ls -h --si` count, binary ones as RSS is paged; a
# bare K/M/G/T is binary, as systemd's MemoryMax= and most ops tools read it.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def _expect(condition: bool) -> None:
    if not condition:
        raise ValueError


def _int_from_text(text: str) -> int:
    _expect(_INT_TEXT.fullmatch(text.strip()) is not None)
    return int(text)


def _int_from_toml(value: Any) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool))
    return int(value)


def _float_from_text(text: str) -> float:
    _expect(_FLOAT_TEXT.fullmatch(text.strip()) is not None)
    value = float(text)
    _expect(math.isfinite(value))  # "1e999" is inf, which TOML's form refuses too
    return value


def _float_from_toml(value: Any) -> float:
    _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    return float(value)


def _bool_from_text(text: str) -> bool:
    word = text.strip().lower()
    _expect(word in _TRUE + _FALSE)
    return word in _TRUE


def _bool_from_toml(value: Any) -> bool:
    _expect(isinstance(value, bool))
    return bool(value)


def _str_from_toml(value: Any) -> str:
    _expect(isinstance(value, str))
    return str(value)


def _optional_from_text(text: str) -> str | None:
    return text or None  # an empty value unsets an optional setting


def _lower_text(text: str) -> str:
    return text.strip().lower()


def _lower_toml(value: Any) -> str:
    return _str_from_toml(value).lower()


def _list_from_text(text: str) -> list[str]:
    # The one list setting is bind: split_bind_list is a split on commas that keeps the networks
    # of a spec's ?allow=NETWORK,NETWORK together.
    return split_bind_list(text)


def _list_from_toml(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    _expect(isinstance(value, list) and all(isinstance(item, str) for item in value))
    return list(value)


def _name_or_id_from_text(text: str) -> str | int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else (text or None)


def _name_or_id_from_toml(value: Any) -> str | int | None:
    if isinstance(value, str):
        return _name_or_id_from_text(value)
    return _int_from_toml(value)


def _mode_from_text(text: str) -> int | None:
    if not text.strip():
        return None
    match = _MODE_TEXT.fullmatch(text.strip())
    _expect(match is not None)
    return int(match.group(2), 8)  # type: ignore[union-attr]


def _mode_from_toml(value: Any) -> int | None:
    # A TOML integer is taken as written: write 0o660 (octal) or "660", not 660 (decimal).
    return _mode_from_text(value) if isinstance(value, str) else _int_from_toml(value)


def _size_from_text(text: str) -> int:
    match = _SIZE_TEXT.fullmatch(text.strip())
    _expect(match is not None and match.group(2).lower() in _SIZE_UNITS)
    number, unit = match.groups()  # type: ignore[union-attr]
    # Exact (a float would overflow on long numbers and round 20-digit ones), rounded down.
    return int(fractions.Fraction(number) * _SIZE_UNITS[unit.lower()])


def _size_from_toml(value: Any) -> int:
    return _size_from_text(value) if isinstance(value, str) else _int_from_toml(value)


def _toml_string(value: Any) -> str:
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_plain(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_plain(item) for item in value) + "]"
    return _toml_string(value)


def _toml_mode(value: Any) -> str:
    return f"0o{value:03o}" if isinstance(value, int) else toml_plain(value)


INT = Kind("an integer", "N", _int_from_text, _int_from_toml, toml_plain)
FLOAT = Kind("a number", "SECONDS", _float_from_text, _float_from_toml, toml_plain)
BOOL = Kind("true or false", "", _bool_from_text, _bool_from_toml, toml_plain)
TEXT = Kind("text", "TEXT", str, _str_from_toml, toml_plain)
WORD = Kind("a name from the list", "NAME", _lower_text, _lower_toml, toml_plain)
OPTIONAL_TEXT = Kind("text (empty: unset)", "TEXT", _optional_from_text, _str_from_toml, toml_plain)
TEXT_LIST = Kind("a list of text (comma-separated in the environment)", "SPEC", _list_from_text,
                 _list_from_toml, toml_plain)
NAME_OR_ID = Kind("a name or a numeric id", "NAME", _name_or_id_from_text, _name_or_id_from_toml, toml_plain)
MODE = Kind("an octal mode such as 0o660 or 660", "MODE", _mode_from_text, _mode_from_toml, _toml_mode)
SIZE = Kind("a size in bytes, optionally with a unit: 200MB, 1.5GiB, 512M (binary), 0 for none",
            "SIZE", _size_from_text, _size_from_toml, toml_plain)
ADDRESS = dataclasses.replace(OPTIONAL_TEXT, allowed="tcp://HOST:PORT (empty: unset)", metavar="ADDRESS")
HOOK = Kind("'module:function'", "MODULE:FUNCTION", _optional_from_text, _str_from_toml, toml_plain)

# The kind of a field whose annotation says enough; others name their kind in the metadata.
KIND_BY_TYPE = {"int": INT, "float": FLOAT, "bool": BOOL, "str": TEXT, "list[str]": TEXT_LIST,
                 "str | None": OPTIONAL_TEXT, "str | int | None": NAME_OR_ID}
