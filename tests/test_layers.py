"""The layers of prefork, checked: imports go one way and never reach into another module's privates.

Rules (an AST walk over prefork/ and workers/; every import counts, also one inside a function or
under ``if TYPE_CHECKING``):

1. A module imports only from its own layer or the layers below it. From the bottom up:

   - **core**: the compatible ``socketserver`` (servers, mixins, handlers, the socketserver
     facade), aio, the asyncio handlers' counterpart of handlers, and ratelimit, the one shape
     of a rate-limited log line, which the servers use as every layer above does. It imports
     nothing else of prefork. What other layers need of it is its public
     extension interface in ``prefork.servers``: ``Poller``, ``LoopServer`` and the additions
     to ``TCPServer`` (``adopt_socket``, ``from_socket``, ``prepare_listener``,
     ``serve_ready``, ``take_request``, ``dispatch_request``).
   - **support**: what every layer above the core uses and that knows none of them: errors
     (the exception tree and exit codes), log (error and access log files), loader
     ('module:attribute' strings). The first drawing of the design put them in the face; the
     master needs them, so they sit beneath it.
   - **bind**: bind specs and listeners (bindspec, listeners, handover: sockets bound before any
     fork, inherited from systemd or from a master being replaced). Never the master.
   - **master**: binds, forks, supervises, and everything a worker does between fork and
     ``os._exit`` (arbiter, pool, worker, scoreboard, signals, ...), plus the metrics process the
     arbiter starts. It reads settings through ``prefork.arbiter.MasterSettings``, a Protocol,
     never through ``prefork.config``.
   - **face**: settings, the command line and the Python API. ``prefork.master`` (``serve()``,
     ``PreforkMixIn``) is the Python API: it turns settings into the master's plan, so it sits
     in the face beside ``cli`` (which calls it) and ``config`` (which it reads), above the
     master. The package's ``__init__`` re-exports core and Python API names, so it is face too.
   - **services**: workers/, the bundled services. prefork never imports them.

2. No module imports another module's underscore names: neither ``from prefork.x import _y`` nor
   ``x._y`` on a prefork module it imported; nor calls a private method or reads a private
   attribute that only another prefork module defines (``server._serve_ready()``; by name, a
   heuristic: ``self`` and modules outside prefork are not checked). What another module needs
   is a public name.

3. No import cycles between prefork's modules (counting function-level and TYPE_CHECKING imports).

4. Every module's first docstring line ends with ``Runs in: <process>``, one of RUNS_IN.

Exceptions are listed in ALLOWED, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE, SUPPORT, BIND, MASTER, FACE, SERVICES = "core", "support", "bind", "master", "face", "services"
ORDER = (CORE, SUPPORT, BIND, MASTER, FACE, SERVICES)

LAYERS = {
    CORE: ("servers", "mixins", "handlers", "aio", "socketserver", "ratelimit"),
    SUPPORT: ("errors", "privileges", "log", "loader"),
    BIND: ("bindspec", "listeners", "handover"),
    MASTER: ("arbiter", "pool", "worker", "signals", "scoreboard", "pidfile", "procstats", "notify",
             "proctitle", "reloads", "accounting", "allowlist", "parking", "modes", "metrics", "children", "latency",
             "proxy", "tls"),
    FACE: ("master", "config", "setting_types", "settings_docs", "cli", "control", "top", "runpaths", "__init__",
           "__main__"),
}
# The event-loop worker (issue 15) runs in the worker beside prefork.worker.
LAYERS[MASTER] += ("aioworker", "aiostages")

# Where each module's code runs: the master process, a worker, both, the prefork CLI's own
# process (status and control commands) or the metrics process.
RUNS_IN = ("master", "worker", "both", "cli", "metrics")

# (importer, imported) pairs that break rule 1 on purpose, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {}

# (importer, "module._name") uses that break rule 2 on purpose, each with its reason.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    return ".".join(relative.parts)


def layer_of(module: str) -> str:
    package, _, name = module.partition(".")
    if package == "workers":
        return SERVICES
    for layer, names in LAYERS.items():
        if (name or "__init__") in names:
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


def sources() -> list[Path]:
    return sorted((ROOT / "prefork").glob("*.py")) + sorted((ROOT / "workers").glob("*.py"))


def imports_of(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names taken from it, line) for each import of a prefork or workers module."""
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            found.append((node.module, names, node.lineno))
            # "from prefork import pool": the module prefork.pool is imported too.
            found += [(f"{node.module}.{n}", [], node.lineno) for n in names if _is_module(f"{node.module}.{n}")]
    return [(m, names, line) for m, names, line in found if m.split(".")[0] in ("prefork", "workers")]


def _is_module(dotted: str) -> bool:
    return (ROOT / Path(*dotted.split("."))).with_suffix(".py").exists()


def module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local dotted names bound to prefork modules: ``import prefork.x [as y]``, ``from prefork import x``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("prefork.") and _is_module(alias.name):
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if _is_module(dotted):
                    aliases[alias.asname or alias.name] = dotted
    return aliases


def _dotted(node: ast.expr) -> str | None:
    """'a.b.c' for a chain of attributes on a name; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def layer_violations(path: Path, tree: ast.AST) -> list[str]:
    importer = module_name(path)
    rank = ORDER.index(layer_of(importer))
    found = []
    for module, _, line in imports_of(tree):
        if module == "prefork" or (importer, module) in ALLOWED:
            continue
        target = layer_of(module)
        if ORDER.index(target) > rank:
            found.append(f"{importer}:{line} ({layer_of(importer)}) imports {module} ({target})")
    return found


def private_uses(path: Path, tree: ast.AST) -> list[str]:
    importer = module_name(path)
    found = []
    for module, names, line in imports_of(tree):
        for name in names:
            if name.startswith("_") and not name.startswith("__") and (importer, f"{module}.{name}") not in ALLOWED_PRIVATE:
                found.append(f"{importer}:{line} imports {module}.{name}")
    aliases = module_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = _dotted(node.value)
            if base in aliases:
                target = f"{aliases[base]}.{node.attr}"
                if (importer, target) not in ALLOWED_PRIVATE:
                    found.append(f"{importer}:{node.lineno} uses {target}")
    return found


def private_names_defined(tree: ast.AST) -> set[str]:
    """The underscore names *tree* defines: functions, classes, variables, attributes, parameters."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def foreign_private_attributes(tree: ast.AST, own: set[str], others: set[str]) -> list[str]:
    """``obj._name`` where *_name* is defined by another prefork module and not by this one.

    A heuristic for reaching into another module's objects (``server._serve_ready()``): the
    object's type is not known, so the attribute's name decides. ``self``/``cls`` and modules
    outside prefork (``os._exit``) are left out.
    """
    outside = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if not alias.name.startswith(("prefork", "workers"))}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"} | outside:
            continue
        if node.attr in others and node.attr not in own:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = {m for m, _, _ in imports_of(tree) if m != "prefork" and _is_module(m)}
        graph[module_name(path)] = edges - {module_name(path)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of *graph*, each once, as found by a depth-first walk."""
    found: list[list[str]] = []
    done: set[str] = set()

    def walk(node: str, trail: list[str]) -> None:
        if node in trail:
            cycle = trail[trail.index(node):]
            if sorted(cycle) not in [sorted(c) for c in found]:
                found.append(cycle + [node])
            return
        if node in done:
            return
        for edge in sorted(graph.get(node, ())):
            walk(edge, trail + [node])
        done.add(node)

    for start in sorted(graph):
        walk(start, [])
    return found


def runs_in(tree: ast.Module) -> str | None:
    docstring = ast.get_docstring(tree)
    first = (docstring or "").splitlines()[0] if docstring else ""
    marker = "Runs in: "
    if marker not in first:
        return None
    return first.rpartition(marker)[2].rstrip(".")


@pytest.fixture(scope="module")
def trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), filename=str(path)) for path in sources()}


def test_every_module_has_a_layer(trees: dict[Path, ast.Module]) -> None:
    for path in trees:
        layer_of(module_name(path))


def test_imports_go_down_the_layers(trees: dict[Path, ast.Module]) -> None:
    found = [v for path, tree in trees.items() for v in layer_violations(path, tree)]
    assert not found, "\n".join(found)


def test_no_module_uses_another_modules_private_names(trees: dict[Path, ast.Module]) -> None:
    found = [v for path, tree in trees.items() for v in private_uses(path, tree)]
    assert not found, "\n".join(found)


def test_no_module_reaches_into_another_modules_objects(trees: dict[Path, ast.Module]) -> None:
    defined = {path: private_names_defined(tree) for path, tree in trees.items()}
    found = []
    for path, tree in trees.items():
        others = set().union(*(names for other, names in defined.items() if other != path))
        found += [f"{module_name(path)}:{use}" for use in foreign_private_attributes(tree, defined[path], others)]
    assert not found, "\n".join(found)


def test_the_object_check_can_fail() -> None:
    tree = ast.parse("import os\ndef f(server):\n    server._serve_ready()\n    os._exit(0)\n    self._own = 1")
    assert foreign_private_attributes(tree, {"_own"}, {"_serve_ready", "_exit", "_own"}) == ["3: server._serve_ready"]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_every_module_says_where_it_runs(trees: dict[Path, ast.Module]) -> None:
    wrong = {module_name(path): runs_in(tree) for path, tree in trees.items() if runs_in(tree) not in RUNS_IN}
    assert not wrong, f"first docstring line must end with 'Runs in: <one of {RUNS_IN}>': {wrong}"


def test_exceptions_still_happen(trees: dict[Path, ast.Module]) -> None:
    # An allowed exception that no longer occurs is a stale entry: remove it.
    imported = {(module_name(p), m) for p, t in trees.items() for m, _, _ in imports_of(t)}
    assert not set(ALLOWED) - imported


@pytest.mark.parametrize("source, importer, expected", [
    ("from prefork.arbiter import Arbiter", "prefork/servers.py", "imports prefork.arbiter"),
    ("import prefork.config", "prefork/arbiter.py", "imports prefork.config"),
    ("def f():\n    from prefork.worker import run_worker", "prefork/listeners.py", "imports prefork.worker"),
    ("from prefork import pool", "prefork/bindspec.py", "imports prefork.pool"),
    ("from prefork.cli import main", "prefork/errors.py", "imports prefork.cli"),
])
def test_the_layer_check_can_fail(source: str, importer: str, expected: str) -> None:
    found = layer_violations(ROOT / importer, ast.parse(source))
    assert len(found) == 1 and expected in found[0]


@pytest.mark.parametrize("source", [
    "from prefork.servers import _Poller",
    "import prefork.servers\nprefork.servers._Poller",
    "import prefork.servers as core\ncore._Poller()",
    "from prefork import servers\nservers._is_listening(None)",
])
def test_the_private_check_can_fail(source: str) -> None:
    assert private_uses(ROOT / "prefork/worker.py", ast.parse(source))


def test_the_cycle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
