"""The layers the code may import, checked on its source (ast, nothing imported):
- kernels/ never imports the suite; the suite and the kernels never import dev/ or tools/;
- the suite's folders are layers (LAYERS, lowest first) and a module imports only its own layer
  or lower ones; suite/core/ imports nothing else of the suite;
- the suite's modules import each other at module level only, never inside a function, and
  those imports have no cycle;
- no module reaches into another's private names (`from m import _x`, `m._x`)."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("suite", "kernels")


# suite/<layer>/... ; cli.py is the top. docs/contributing.md draws the same picture.
LAYERS = ("core", "analysis", "measure", "store", "workloads", "run", "report", "publish", "cli")


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_kernels_never_import_the_suite_and_nothing_imports_dev_or_tools():
    bad = []
    for folder in PROJECT:
        for path in _modules(folder):
            for mod, _ in _imports(path):
                top = mod.split(".")[0]
                if top in ("dev", "tools") or (folder == "kernels" and top == "suite"):
                    bad.append(f"{_rel(path)} imports {mod}")
    assert not bad, bad


def test_core_imports_nothing_else_of_the_suite():
    bad = [f"{_rel(p)} imports {mod}" for p in _modules("suite/core") for mod, _ in _imports(p)
           if mod.startswith("suite") and not mod.startswith("suite.core")]
    assert not bad, bad


def _project_module_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to a module of the project (import suite.x as y, from suite import x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT:
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PROJECT:
                continue
            for a in node.names:
                if (ROOT / Path(*node.module.split(".")) / f"{a.name}.py").exists() or \
                        (ROOT / Path(*node.module.split(".")) / a.name).is_dir():
                    names.add(a.asname or a.name)
    return names


def test_no_module_reaches_into_another_modules_private_names():
    bad = []
    for folder in PROJECT:
        for path in _modules(folder):
            tree = ast.parse(path.read_text())
            for mod, names in _imports(path):
                if mod.split(".")[0] in PROJECT:
                    bad += [f"{_rel(path)}: from {mod} import {n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
            aliases = _project_module_aliases(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in aliases and node.attr.startswith("_")
                        and not node.attr.startswith("__")):
                    bad.append(f"{_rel(path)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


def _suite_module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """The layer index of a suite module (suite.<layer>... or suite.cli), None for the package."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None


def _suite_targets(mod: str, names: list[str]) -> list[str]:
    """The suite modules an import statement brings in (`from suite.x import y` may name a
    module y or a name of suite.x)."""
    if not mod.startswith("suite"):
        return []
    out = []
    for n in names or [None]:
        sub = f"{mod}.{n}" if n else mod
        path = ROOT / Path(*sub.split("."))
        out.append(sub if n and (path.with_suffix(".py").exists() or path.is_dir()) else mod)
    return out


def test_layers_import_only_downward():
    assert {p.name for p in (ROOT / "suite").iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(LAYERS) - {"cli"}, "a suite folder that is not a layer (add it to LAYERS)"
    bad = []
    for path in _modules("suite"):
        here = _layer(_suite_module(path))
        for mod, names in _imports(path):
            for target in _suite_targets(mod, names):
                there = _layer(target)
                if here is not None and there is not None and there > here:
                    bad.append(f"{_rel(path)} ({LAYERS[here]}) imports {target} ({LAYERS[there]})")
    assert not bad, bad


def test_suite_modules_import_each_other_at_module_level():
    bad = []
    for path in _modules("suite"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if mod and mod.split(".")[0] in PROJECT:
                    bad.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


def test_suite_imports_have_no_cycle():
    graph = {}
    for path in _modules("suite"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.update(_suite_targets(node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("suite"))
        graph[_suite_module(path)] = deps - {_suite_module(path)}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_each_layer_imports_alone(layer):
    """A layer imports with only the layers below it (in a fresh interpreter)."""
    mods = [_suite_module(p) for p in _modules(f"suite/{layer}")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + (
        "higher = sorted({m.split('.')[1] for m in sys.modules if m.startswith('suite.')}"
        f" - set({list(LAYERS[:LAYERS.index(layer) + 1])!r}))\n"
        "assert not higher, higher\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_root_constant_names_the_repository_root():
    """A module that finds the repository from its own path (ROOT = ...parents[k]) must count
    its folder depth right, or a child process starts in the wrong folder."""
    bad = []
    for path in _modules("suite"):
        if "ROOT = " in path.read_text():
            root = importlib.import_module(_suite_module(path)).ROOT
            if not (Path(root) / "harness.py").is_file():
                bad.append(f"{_rel(path)}: ROOT = {root}")
    assert not bad, bad
