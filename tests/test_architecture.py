"""The import graph of ftcli/ stays honest: no cycles, no import up a layer, no heavy library where start-up reads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ftcli"
# Layers from the bottom; a module may import its own layer and the ones below, never above. Modules directly under
# ftcli/ other than the entry points are the foundation every layer may use.
LAYERS = {
    "ftcli": 0,
    "ftcli.recipe": 1,
    "ftcli.runs": 2,
    "ftcli.data": 3, "ftcli.models": 3,
    "ftcli.training": 4, "ftcli.inference": 4, "ftcli.export": 4,
    "ftcli.cli": 5,
}
ENTRY_POINTS = {"ftcli.__main__"}
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")
# What `ftcli --help` and `ftcli validate` load: these and everything they import at module level stay light.
START_UP = ("ftcli.cli.entry", "ftcli.cli.app")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file, function-level ones included."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from ftcli.x import y` may import the submodule ftcli.x.y
            found += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
            found.append((base, id(node) in top_level))
    return found


def graph(root: Path = PACKAGE) -> dict[str, dict[str, bool]]:
    """{module: {ftcli module it imports: imported at module level}}, resolved to modules that exist."""
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    edges: dict[str, dict[str, bool]] = {}
    for name, path in modules.items():
        targets = edges.setdefault(name, {})
        for target, top in imports_of(path, root):
            if target in modules and target != name:
                targets[target] = targets.get(target, False) or top
    return edges


def layer_of(module: str) -> tuple[str, int]:
    """(the layer's package, its rank): ftcli.<package>... by its package, modules directly under ftcli/ rank 0."""
    parts = module.split(".")
    package = ".".join(parts[:2])
    if package in LAYERS:
        return package, LAYERS[package]
    assert len(parts) <= 2, f"{module} is in no layer: add its package to LAYERS in {__file__}"
    return "ftcli", LAYERS["ftcli"]


def cycles(edges: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, {})):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def upward_imports(edges: dict[str, dict[str, bool]]) -> list[str]:
    wrong = []
    for source, targets in edges.items():
        if source in ENTRY_POINTS:
            continue
        source_layer, source_rank = layer_of(source)
        for target in targets:
            target_layer, target_rank = layer_of(target)
            if target_rank > source_rank or (target_rank == source_rank and target_layer != source_layer
                                             and source_rank != 0):
                wrong.append(f"{source} ({source_layer}) imports {target} ({target_layer})")
    return sorted(wrong)


def test_no_cycles():
    assert cycles(graph()) == []


def test_no_import_goes_up_a_layer_or_sideways():
    assert upward_imports(graph()) == []


def test_every_subpackage_init_is_empty():
    for init in PACKAGE.rglob("__init__.py"):
        body = [node for node in ast.parse(init.read_text()).body
                if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        assert body == [], f"{init} holds code: start-up pays for it"


def test_start_up_modules_import_no_heavy_library_at_module_level():
    edges = graph()
    reached, todo = set(), list(START_UP)
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        todo += [target for target, top in edges.get(module, {}).items() if top]
    heavy = []
    for module in sorted(reached):
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        heavy += [f"{module}: {name}" for name, top in imports_of(path) if top and name.split(".")[0] in HEAVY]
    assert heavy == []
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ftcli.cli.app, ftcli.cli.entry; "
                               f"print(sorted(set(m.split('.')[0] for m in sys.modules) & set({HEAVY!r})))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


# ---------------------------------------------------------------------------------------------- the test can fail


def _planted(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "ftcli"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_cycle_is_found(tmp_path):
    root = _planted(tmp_path, {
        "__init__.py": "", "export/__init__.py": "", "models/__init__.py": "",
        "export/merge.py": "def f():\n    from ftcli.export.qlora import g\n",
        "export/qlora.py": "def g():\n    from ftcli.export.merge import f\n",
        "models/load.py": "import os\n",
    })
    assert cycles(graph(root)) == [["ftcli.export.merge", "ftcli.export.qlora", "ftcli.export.merge"]]


@pytest.mark.parametrize("source, target, wrong", [
    ("runs/rundir.py", "ftcli.models.sources", True),     # up: runs sits below models
    ("data/cache.py", "ftcli.models.load", True),         # sideways between two packages of one layer
    ("training/session.py", "ftcli.models.load", False),  # down
    ("models/load.py", "ftcli.errors", False),            # the foundation
])
def test_a_planted_upward_import_is_found(tmp_path, source, target, wrong):
    files = {"__init__.py": "", "errors.py": ""}
    for package in ("runs", "models", "data", "training"):
        files[f"{package}/__init__.py"] = ""
    files.update({"models/sources.py": "", "models/load.py": "", source: f"def f():\n    import {target}\n"})
    assert bool(upward_imports(graph(_planted(tmp_path, files)))) is wrong
