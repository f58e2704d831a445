"""The package's import graph (issue 23): no cycle, and the one-way rules that already hold stay held.

Every import statement counts, module-level or inside a function: a lazy import is still a dependency (the cycle
field_loading -> stock_loading -> preflight -> field_loading was made of one). Read from the source with ``ast``, so
the test imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "danceopd_diffusers"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a package's own ancestors, imported for a submodule, left out)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets = [f"{name}.{a.name}" if f"{name}.{a.name}" in modules else name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in modules and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets (each as the path that closes it)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def _reach(graph: dict[str, set[str]], module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _leaf_wing(module: str) -> bool:
    """ShapesWorld (world, scorer, evaluate, study, demo) and the test fixtures of ``tiny``."""
    return module.startswith(("danceopd_diffusers.shapesworld", "danceopd_diffusers.tiny"))


def test_the_method_core_imports_neither_the_benchmark_world_nor_test_fixtures():
    """fields, routing, rollout, objectives and the family base are the algorithm: they know no ShapesWorld and no
    tiny test pipeline."""
    graph = import_graph()
    core = [
        f"danceopd_diffusers.{m}" for m in ("fields", "routing", "rollout", "objectives", "families.base")
    ]
    for module in core:
        bad = {m for m in _reach(graph, module) if _leaf_wing(m)}
        assert not bad, (module, sorted(bad))


def test_the_library_never_imports_the_benchmark_world_or_the_test_fixtures():
    """Three wings, arrows one way: the plugin library at the bottom, ShapesWorld and ``tiny`` above it; no library
    module reaches either (the training script, outside the package, may use the demo)."""
    graph = import_graph()
    for module in graph:
        if not _leaf_wing(module):
            bad = sorted(m for m in _reach(graph, module) if _leaf_wing(m))
            assert not bad, f"{module} imports {bad}"


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each node's floor: 1 for a node that imports none of the others, else one above its highest import."""
    out: dict[str, int] = {}

    def level(node: str) -> int:
        if node not in out:
            out[node] = 1 + max((level(m) for m in graph[node] if m != node), default=0)
        return out[node]

    for node in graph:
        level(node)
    return out


def rooms(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph of the house's rooms, as the architecture review drew it: a subpackage (``families``,
    ``pipelines``, ``shapesworld``, ``tiny``) is one room, every other module of the package is its own."""
    subpackages = {m for m, path in _modules().items() if path.name == "__init__.py" and m.count(".") == 1}

    def room(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if ".".join(parts[:2]) in subpackages else module

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(room(module), set()).update(room(t) for t in targets)
    return {r: targets - {r} for r, targets in out.items()}


def test_the_house_has_at_most_eight_floors_with_the_script_on_top():
    graph = rooms(import_graph())
    script = Path(__file__).resolve().parents[1] / "train_danceopd.py"
    imported = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    graph["train_danceopd"] = {r for r in graph if any(m == r or m.startswith(r + ".") for m in imported)}
    assert not find_cycles(graph), find_cycles(graph)
    floors = levels(graph)
    assert max(floors.values()) <= 8, sorted(floors.items(), key=lambda kv: -kv[1])[:10]
    assert floors["train_danceopd"] == max(floors.values())  # nothing of the package stands above the script
    assert levels({"a": {"b"}, "b": {"c"}, "c": set()})["a"] == 3


def test_the_package_exports_resolve():
    """Every name of the curated ``__all__`` resolves, to the object its module defines."""
    import importlib

    import danceopd_diffusers

    for name in danceopd_diffusers.__all__:
        value = getattr(danceopd_diffusers, name)
        if name != "__version__":
            module = importlib.import_module(f"danceopd_diffusers.{danceopd_diffusers._EXPORTS[name]}")
            assert getattr(module, name) is value, name
