"""Files generated from the settings: the README's table and deploy/prefork.toml. Runs in: master.

``prefork generate`` writes them; a test fails when either is stale.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefork.config import TABLE_END, TABLE_START, Option, options
from prefork.errors import ConfigError
from prefork.setting_types import BOOL

__all__ = ["settings_table", "example_config", "write_generated"]


# -- generated files: the README's settings table and deploy/prefork.toml ---------------------


def settings_table() -> str:
    """The Markdown table between the README's settings-table markers."""
    lines = [
        "<!-- generated from prefork/config.py by `prefork generate`; do not edit by hand -->",
        "Each setting is a key in the config file (`-c FILE`, else `[tool.prefork]` in "
        "`./pyproject.toml`), an environment variable and a flag of `prefork run`. Later sources "
        "win: defaults < config file < environment < command line. In the environment and on the "
        "command line an empty value unsets an optional setting, and a list is comma-separated in "
        "the environment. `deploy/prefork.toml` is an example file with every key.",
        "",
        "| key | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for option in options():
        flags = f"`{option.short}`, `{option.flag}`" if option.short else f"`{option.flag}`"
        if option.kind is BOOL:
            flags += f", `--no-{option.flag[2:]}`"
        meaning = f"{option.help}; {option.kind.allowed}".replace("|", "\\|")
        lines.append(f"| `{option.name}` | {flags} | `{option.env}` | {option.describe_default()} | {meaning} |")
    return "\n".join(lines)


def example_config() -> str:
    """deploy/prefork.toml: every key with its help and default; commented out where the default is fine."""
    lines = [
        "# prefork configuration: every setting, with its help and default.",
        "# Generated from prefork/config.py by `prefork generate`; edit a copy, not the comments.",
        "# Use it with: prefork run APP -c prefork.toml   (or put the keys under [tool.prefork] in",
        "# pyproject.toml). PREFORK_<KEY> environment variables and command-line flags override it.",
        "# A commented-out key shows its default; remove the '#' to change it.",
    ]
    section = None
    for option in options():
        if option.section != section:
            section = option.section
            lines += ["", f"# == {section} " + "=" * (90 - len(section))]
        lines += ["", *_wrap_comment(f"{option.help}; {option.kind.allowed}."), _example_line(option)]
    return "\n".join(lines) + "\n"


def _example_line(option: Option) -> str:
    if option.deploy is not None:
        return f"{option.name} = {option.kind.to_toml(option.deploy)}"
    if option.default_text is not None:
        return f"# {option.name}: default: {option.default_text}"
    if option.default is None:
        if option.sample is None:
            raise TypeError(f"setting {option.name!r} is unset by default: give it a sample= in _setting()")
        return f"# {option.name} = {option.kind.to_toml(option.sample)}    # default: unset"
    return f"# {option.name} = {option.kind.to_toml(option.default)}"


def _wrap_comment(text: str, width: int = 98) -> list[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    return lines + [line]


def write_generated(root: str | os.PathLike[str], check: bool = False) -> list[Path]:
    """Regenerate README.md's settings table and deploy/prefork.toml under *root*.

    Returns the files that were stale; with *check* they are only reported, not written.
    """
    readme, example = Path(root, "README.md"), Path(root, "deploy", "prefork.toml")
    stale = []
    for path, new in ((readme, _with_table(readme, _read(readme))), (example, example_config())):
        if _read(path) != new:
            stale.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(new, encoding="utf-8")
    return stale


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _with_table(path: Path, text: str | None) -> str:
    if text is None or TABLE_START not in text or TABLE_END not in text:
        raise ConfigError(f"{path}: the markers {TABLE_START} and {TABLE_END} are missing")
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    return f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}"
