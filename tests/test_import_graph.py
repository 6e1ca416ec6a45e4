"""The project's import graph: no cycle, and every part imports only what it may (function-level
imports count too). The parts are those of docs/architecture.md."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("backend", "protocol")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports anywhere in its body."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import sub`` depends on the submodule, not on the package.
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules] or [node.module]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


# The engine's face for the server: what a server may know of the engine (not its insides).
ENGINE_INTERFACE = ("backend.engine.interface", "backend.engine.errors", "backend.engine.oom",
                    "backend.engine.types", "backend.engine.params")
# Each part (a module-name prefix; the longest that matches a module is its part) and what it
# may import besides its own modules. Nothing imports the server, the tools or the command line
# but themselves and the entry point.
RULES: dict[str, tuple[str, ...]] = {
    "protocol": (),  # the contract, shared with the plug-in: nothing of the backend
    "backend.engine": (),  # pure torch/numpy: no server, tools, demo, command line
    "backend.demo": ("backend.engine", "backend.model_choice"),  # the demo model, its benchmark
    "backend.model_choice": ("backend.engine", "backend.hub"),  # which model is served
    "backend.server": ("protocol", "backend.model_choice", "backend", "backend.hub",
                       *ENGINE_INTERFACE),
    "backend.server.cli": ("protocol", "backend.server", "backend.model_choice",
                           "backend.engine", "backend.hub"),  # serve's glue: it loads the engine
    "backend.commands": ("backend.engine", "backend.model_choice", "backend.cli",
                         "backend.cli_progress"),
    "backend.cli_progress": (),
    "backend.cli": ("backend.engine",),  # the entry point (its commands load by name)
    "backend.__main__": ("backend.cli",),
    "backend.tools": ("backend.engine", "backend.demo", "backend.model_choice", "backend.cli"),
    "backend.hub": (),  # the model catalogue and its downloads: huggingface_hub, no torch
    "backend.hub.cli": ("backend.hub", "backend.cli"),  # models list|get|verify|remove
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def part_of(module: str) -> str | None:
    parts = [p for p in RULES if _under(module, p)]
    return max(parts, key=len) if parts else None


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import its part may not make."""
    bad = []
    for module, deps in sorted(graph.items()):
        part = part_of(module)
        if part is None:
            if module != "backend":  # the package face only hands names on
                bad.append(f"{module}: in no part of RULES")
            continue
        for dep in sorted(deps):
            own = part_of(dep) == part
            allowed = any(dep == p or (p != "backend" and _under(dep, p)) for p in RULES[part])
            if not (own or allowed):
                bad.append(f"{module} -> {dep}")
    return bad


def test_the_rules_catch_a_forbidden_import():
    graph = {"backend.engine.pipeline": {"backend.server.jobs"},
             "backend.server.server": {"backend.engine.models", "backend.engine.params"},
             "backend.tools.bench": {"backend.engine.pipeline"}}
    assert forbidden_imports(graph) == ["backend.engine.pipeline -> backend.server.jobs",
                                        "backend.server.server -> backend.engine.models"]


def test_every_part_imports_only_what_it_may():
    assert forbidden_imports(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "backend.engine.models" in graph  # the walk found the modules
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_models_only_loads():
    """The loader imports no test-model builder and no checkpoint writer code."""
    deps = import_graph()["backend.engine.models"]
    assert "backend.engine.random_tiny" not in deps
    source = (ROOT / "backend" / "engine" / "models.py").read_text("utf-8")
    assert "def save_single_file" not in source


# --- what GIMP's Python must be able to import (issue 21) ------------------------------------
PLUGIN = ROOT / "gimp_plugin" / "drag-diffusion"
GIMP_PROVIDES = {"gi"}  # GIMP's own bindings; everything else must be the standard library
PYZMQ_SIDE = {"protocol.transport_pyzmq", "protocol.curve"}  # imported only where pyzmq loads


def _imports(path: Path) -> list[tuple[str, str]]:
    """(imported module, how) for every import in ``path``; how: ``module`` (runs at import),
    ``lazy`` (inside a function), ``optional`` (in a try that catches ImportError) or
    ``typing`` (under ``if TYPE_CHECKING``)."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, how: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = how
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = "lazy"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = "typing"
            elif isinstance(child, ast.Try) and any(
                    "ImportError" in ast.unparse(h.type or ast.Name("BaseException"))
                    for h in child.handlers):
                inner = "optional" if how == "module" else how
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.extend((f"{child.module}.{alias.name}", inner) for alias in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text("utf-8")), "module")
    return found


def _protocol_module(name: str) -> str | None:
    """``protocol.x`` for an import of protocol's module x (or of a name from it)."""
    parts = name.split(".")
    if parts[0] != "protocol":
        return None
    if len(parts) > 1 and (ROOT / "protocol" / f"{parts[1]}.py").exists():
        return f"protocol.{parts[1]}"
    return "protocol"


def plugin_side() -> dict[str, Path]:
    """The plug-in's files and the protocol modules they reach, except the pyzmq side."""
    files = {p.stem: p for p in PLUGIN.glob("*.py")}
    todo = list(files.values())
    while todo:
        for name, _ in _imports(todo.pop()):
            module = _protocol_module(name)
            if module and module not in PYZMQ_SIDE and module not in files:
                path = ROOT / "protocol" / ("__init__.py" if module == "protocol"
                                            else f"{module.split('.')[1]}.py")
                files[module] = path
                todo.append(path)
    return files


def test_the_plugin_side_imports_only_the_standard_library():
    """The plug-in and the protocol modules it reaches run in GIMP's Python with its standard
    library alone; the pyzmq transport (and CURVE) is imported lazily, only where pyzmq
    loads. tests/test_plugin_no_compiled.py checks the same by running an edit."""
    side = plugin_side()
    assert {"protocol.client", "protocol.transport", "protocol.transport_zmtp",
            "protocol.zmtp", "protocol.msgpack_codec", "protocol.wire"} <= set(side)
    bad = []
    for module, path in side.items():
        for name, how in _imports(path):
            top = name.split(".")[0]
            if (top in sys.stdlib_module_names or top in GIMP_PROVIDES or how == "typing"
                    or (top == "numpy" and how == "optional")):
                continue
            if top in side or top.startswith("dragdiff_"):
                continue
            target = _protocol_module(name)
            if target in side or (target in PYZMQ_SIDE and how == "lazy"):
                continue
            bad.append(f"{module} imports {name} ({how})")
    assert not bad, bad


def test_only_the_pyzmq_side_of_protocol_imports_zmq_and_nothing_imports_msgpack():
    zmq_users = sorted(p.stem for p in (ROOT / "protocol").glob("*.py")
                       if any(name.split(".")[0] == "zmq" for name, _ in _imports(p)))
    assert zmq_users == sorted(name.split(".")[1] for name in PYZMQ_SIDE)
    msgpack_users = [str(p.relative_to(ROOT)) for pkg in ("protocol", "backend", "gimp_plugin")
                     for p in (ROOT / pkg).rglob("*.py")
                     if any(name.split(".")[0] == "msgpack" for name, _ in _imports(p))]
    assert msgpack_users == []
