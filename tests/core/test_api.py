"""API parity of prefork.socketserver with the standard library's socketserver.

The stdlib module is imported here only to compare against it.
"""

from __future__ import annotations

import ast
import inspect
import socketserver as stdlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import prefork
import prefork.socketserver as facade
from prefork.servers import LoopServer

PACKAGE_DIR = Path(prefork.__file__).parent

# What prefork adds to the stdlib's public class attributes (documented in servers.py):
# adopting an already bound socket, and one request in two steps (a worker holds a connection
# in between until its first message is in), and a loop of the caller's own over the listener
# (the core's extension interface, servers.LoopServer). Everything else must match exactly.
ADDITIONS = {"TCPServer": {"adopt_socket", "from_socket", "take_request", "dispatch_request",
                           "prepare_listener", "serve_ready"}}

# Dunder methods whose signature code written for the stdlib relies on.
DUNDERS = ("__init__", "__enter__", "__exit__")


def public_attributes(cls: type) -> dict[str, Any]:
    """Public class attributes of *cls*, walking its MRO the way attribute lookup does."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            found.update({k: v for k, v in vars(klass).items() if not k.startswith("_")})
    return found


def additions_of(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        names |= ADDITIONS.get(klass.__name__, set())
    return names


def plain_signature(func: Any) -> inspect.Signature:
    """The signature without annotations: the stdlib has none, we are typed."""
    sig = inspect.signature(func)
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=sig.empty)


def comparable(value: Any) -> Any:
    """A value to compare: methods by kind, data by value."""
    if isinstance(value, (staticmethod, classmethod, property)):
        return type(value).__name__
    if inspect.isfunction(value):
        return "function"
    return value


def test_all_equals_stdlib_all():
    assert sorted(facade.__all__) == sorted(stdlib.__all__)


def test_facade_has_no_other_public_names():
    public = {name for name in vars(facade) if not name.startswith("_")}
    assert public == set(facade.__all__)


def test_package_reexports_every_facade_name():
    missing = set(facade.__all__) - set(prefork.__all__)
    assert not missing
    for name in facade.__all__:
        assert getattr(prefork, name) is getattr(facade, name)


@pytest.mark.parametrize("name", sorted(stdlib.__all__))
def test_same_mro_names(name):
    ours = [c.__name__ for c in getattr(facade, name).__mro__]
    theirs = [c.__name__ for c in getattr(stdlib, name).__mro__]
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(stdlib.__all__))
def test_same_public_class_attributes(name):
    ours_cls = getattr(facade, name)
    ours = public_attributes(ours_cls)
    theirs = public_attributes(getattr(stdlib, name))
    assert set(ours) - additions_of(ours_cls) == set(theirs)
    for attr, value in theirs.items():
        assert comparable(ours[attr]) == comparable(value), attr


@pytest.mark.parametrize("name", sorted(stdlib.__all__))
def test_same_method_signatures(name):
    ours, theirs = getattr(facade, name), getattr(stdlib, name)
    methods = [a for a, v in public_attributes(theirs).items() if callable(v)]
    methods += [d for d in DUNDERS if getattr(theirs, d, None) not in (None, getattr(object, d, None))]
    for method in methods:
        expected = plain_signature(getattr(theirs, method))
        assert plain_signature(getattr(ours, method)) == expected, f"{name}.{method}"


@pytest.mark.parametrize("name", [n for n in sorted(stdlib.__all__) if n.endswith("Server")])
def test_every_server_class_is_a_loop_server(name):
    # The core's extension interface (prefork.servers.LoopServer) holds for every server class.
    methods = [m for m, v in vars(LoopServer).items() if not m.startswith("_") and callable(v)]
    assert "serve_ready" in methods
    missing = [m for m in methods if not hasattr(getattr(facade, name), m)]
    assert missing == ([] if name != "BaseServer" else ["fileno", "prepare_listener", "serve_ready",
                                                        "take_request", "dispatch_request"])


def test_additions_are_only_on_socket_servers():
    # The additions stay off BaseServer, the mixins and the handlers.
    for name in ("BaseServer", "ThreadingMixIn", "BaseRequestHandler", "StreamRequestHandler"):
        assert not ADDITIONS["TCPServer"] & set(public_attributes(getattr(facade, name)))


def _imports_socketserver(tree: ast.AST) -> list[int]:
    """Line numbers where *tree* imports the stdlib socketserver, by statement or by call."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name.split(".")[0] == "socketserver" for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] == "socketserver":
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and _is_dynamic_import_of_socketserver(node):
            lines.append(node.lineno)
    return lines


def _is_dynamic_import_of_socketserver(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name not in ("import_module", "__import__") or not call.args:
        return False
    first = call.args[0]
    return isinstance(first, ast.Constant) and first.value == "socketserver"


def test_ast_scan_finds_an_import():
    # The scanner itself must be able to fail.
    assert _imports_socketserver(ast.parse("import socketserver")) == [1]
    assert _imports_socketserver(ast.parse("from socketserver import TCPServer")) == [1]
    assert _imports_socketserver(ast.parse("importlib.import_module('socketserver')")) == [1]
    assert _imports_socketserver(ast.parse("from . import socketserver")) == []


def test_no_module_of_prefork_imports_stdlib_socketserver():
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "socketserver.py" in sources
    offenders = {}
    for path in sources:
        lines = _imports_socketserver(ast.parse(path.read_text(), filename=str(path)))
        if lines:
            offenders[str(path.relative_to(PACKAGE_DIR))] = lines
    assert not offenders


def test_importing_prefork_does_not_load_stdlib_socketserver():
    code = "import prefork, prefork.socketserver, sys; assert 'socketserver' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
