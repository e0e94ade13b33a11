"""The layers the code may import, checked on its source (ast, nothing imported):
- kernels/ never imports the suite; the suite and the kernels never import dev/ or tools/;
- suite/core/ imports nothing else of the suite;
- no module reaches into another's private names (`from m import _x`, `m._x`)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("suite", "kernels")


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
