"""The layout's rules (ARCHITECTURE.md), pinned: arrows point one way, and no import cycles.

Read from the source with ``ast`` (imports inside functions count too), so a rule broken by a
lazy import is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import normlab

ROOT = Path(normlab.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (no run-time import)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def _imports(name: str, path: Path, *, runtime_only: bool = False) -> set[str]:
    """The normlab modules ``name`` imports, at module level or inside functions (``from pkg
    import module`` names the module); ``runtime_only`` leaves out ``if TYPE_CHECKING:`` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = _type_checking_only(tree) if runtime_only else set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("normlab")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("normlab"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found


def test_the_model_tools_never_import_the_lab():
    offenders = {name: sorted(i for i in _imports(name, path) if i.startswith("normlab.lab"))
                 for name, path in MODULES.items() if name.startswith("normlab.surgery")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package", ["normlab.layers", "normlab.functional", "normlab.reference", "normlab.stats"])
def test_the_core_never_imports_the_tools_or_the_lab(package):
    offenders = {name: sorted(i for i in _imports(name, path)
                              if i.startswith(("normlab.lab", "normlab.surgery", "normlab.cli")))
                 for name, path in MODULES.items() if name == package or name.startswith(package + ".")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_command_line_imports_the_lab():
    offenders = sorted(name for name, path in MODULES.items()
                       if not name.startswith(("normlab.lab", "normlab.cli", "normlab.__main__"))
                       and any(i.startswith("normlab.lab") for i in _imports(name, path)))
    assert offenders == []


def test_no_import_cycles():
    """Among run-time imports, lazy ones inside functions included (a package's own __init__
    importing its modules is no cycle back from them: a module's import of its package's
    __init__ is not counted)."""
    graph = {name: {i for i in _imports(name, path, runtime_only=True) if i in MODULES and i != name
                    and not name.startswith(i + ".")}
             for name, path in MODULES.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
