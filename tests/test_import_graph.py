"""The project's import graph: no cycle, and every part imports only what it may (function-level
imports count too). The parts are those of docs/architecture.md."""

from __future__ import annotations

import ast
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
    "backend.model_choice": ("backend.engine",),  # which model is served
    "backend.server": ("protocol", "backend.model_choice", "backend", *ENGINE_INTERFACE),
    "backend.server.cli": ("protocol", "backend.server", "backend.model_choice",
                           "backend.engine"),  # serve's glue: it loads the engine
    "backend.commands": ("backend.engine", "backend.model_choice", "backend.cli",
                         "backend.cli_progress"),
    "backend.cli_progress": (),
    "backend.cli": ("backend.engine",),  # the entry point (its commands load by name)
    "backend.__main__": ("backend.cli",),
    "backend.tools": ("backend.engine", "backend.demo", "backend.model_choice", "backend.cli"),
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
