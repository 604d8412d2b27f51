"""The package's import graph, read from the source (ast): no cycles, and layers that point one way.

Layers, lowest first: core (model, target, masks, loss, data, distributed, io, errors, draft_checks) ← recipe /
inference (and the recipe entry point `train_dspark`) ← the CLI tools (cli, demo, tools, the `python -m` shims).
A module may import its own layer or a lower one. Every import counts: top-level, inside a function (a lazy import
is still a dependency) and under TYPE_CHECKING; the lazy `_EXPORTS` tables of package `__init__`s count as imports
too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "nemo_automodel_dspark"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

CORE, MIDDLE, TOOLS = 0, 1, 2
LAYERS = {
    PACKAGE: CORE,  # the root's lazy exports name core objects only (checked through its _EXPORTS)
    "model": CORE,
    "target": CORE,
    "masks": CORE,
    "loss": CORE,
    "data": CORE,
    "distributed": CORE,
    "io": CORE,
    "manifest": CORE,
    "errors": CORE,
    "options": CORE,
    "quiet": CORE,
    "lazy": CORE,
    "draft_checks": CORE,
    "export": CORE,
    "recipe": MIDDLE,
    "inference": MIDDLE,
    "train_dspark": MIDDLE,
    "cli": TOOLS,
    "demo": TOOLS,
    "tools": TOOLS,
    "evaluate": TOOLS,
    "__main__": TOOLS,
}
LAYER_NAMES = {CORE: "core", MIDDLE: "recipe/inference", TOOLS: "CLI tools"}


def module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute names of everything `module` imports from this package (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        elif _is_exports_table(node):
            names.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _is_exports_table(node: ast.AST) -> bool:
    """`_EXPORTS = {"Name": "package.module", ...}`: a package's lazy re-exports."""
    return (
        isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Dict)
        and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets)
    )


def module_graph() -> dict[str, set[str]]:
    """module → the package's modules it imports (names that are not modules, e.g. classes, are dropped)."""
    modules = all_modules()
    return {
        module: {name for name in imported_names(path, module) if name in modules and name != module}
        for module, path in modules.items()
    }


def unit(module: str) -> str:
    """The layer unit of a module: its first component under the package (`model`, `cli`), or the root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, …, a], or None (iterative DFS, nodes visited in sorted order)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, deps in graph.items():
        units.setdefault(unit(module), set()).update(unit(d) for d in deps if unit(d) != unit(module))
    return units


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({LAYER_NAMES[LAYERS[unit(module)]]}) imports {dep} ({LAYER_NAMES[LAYERS[unit(dep)]]})"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if LAYERS[unit(dep)] > LAYERS[unit(module)]
    ]


def test_every_module_has_a_layer():
    missing = sorted({unit(m) for m in all_modules()} - set(LAYERS))
    assert not missing, f"add these to LAYERS in tests/test_imports.py: {missing}"


def test_no_module_cycle():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_subpackages():
    cycle = find_cycle(unit_graph(module_graph()))
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle or [])


def test_layers_point_down():
    assert upward_imports(module_graph()) == []


# The checker itself, on hand-built graphs: it must see what it is meant to see.


def test_find_cycle_finds_the_cycle_and_nothing_else():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from nemo_automodel_dspark.cli import main", {"nemo_automodel_dspark.cli"}),
        ("def f():\n    from ..errors import ToolError", {"nemo_automodel_dspark.errors"}),
        ("from . import prompts", {"nemo_automodel_dspark.inference", "nemo_automodel_dspark.inference.prompts"}),
        ("import torch\nimport nemo_automodel.recipes", set()),
    ],
)
def test_imported_names_resolves_lazy_and_relative_imports(tmp_path, source, expected):
    path = tmp_path / "evaluate.py"
    path.write_text(source)
    modules = all_modules()
    found = {n for n in imported_names(path, f"{PACKAGE}.inference.evaluate") if n in modules}
    assert found == expected


def test_an_upward_import_is_reported():
    graph = {f"{PACKAGE}.inference.evaluate": {f"{PACKAGE}.cli"}, f"{PACKAGE}.cli": set()}
    assert upward_imports(graph) == [
        f"{PACKAGE}.inference.evaluate (recipe/inference) imports {PACKAGE}.cli (CLI tools)"
    ]
