"""The layout's rules (ARCHITECTURE.md), pinned: arrows point one way, no import cycles, and
(issue 12) functional mirrors reference, layers use only functional's public names, no module
outgrows 600 lines without saying why, and each shared rule has one home.

Read from the source with ``ast`` (imports inside functions count too), so a rule broken by a
lazy import is caught as well.
"""

from __future__ import annotations

import ast
import inspect
import re
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


# --------------------------------------------------------------------------------------------
# Issue 12: one home for every concept, the math in functional/, thin layers
# --------------------------------------------------------------------------------------------


def _public_functions(module) -> set[str]:
    return {name for name in module.__all__ if inspect.isfunction(getattr(module, name))}


def test_functional_public_functions_equal_references():
    """normlab.functional mirrors normlab.reference name for name (ARCHITECTURE.md).

    The one declared exception: reference's analytic ``*_backward`` functions, an oracle for
    autograd, which computes functional's backward (the tests hold one against the other).
    functional's result types (the NamedTuples ``BatchNormResult``, ``BatchStats``, ...) are
    functional's alone: reference returns plain tuples. The public submodules
    ``normlab.functional.act`` and ``normlab.functional.sync`` hold what is no formula of the
    reference (the fused autograd function's activation algebra, collectives).
    """
    import normlab.functional as F
    import normlab.reference as R

    assert _public_functions(R) == set(R.__all__), "reference's public names are all functions"
    assert _public_functions(F) == {name for name in R.__all__ if not name.endswith("_backward")}
    types = set(F.__all__) - _public_functions(F)
    assert all(issubclass(getattr(F, name), tuple) for name in types), types


def _functional_imports(name: str, path: Path):
    """``(line, what)`` for every import into ``name`` of something from normlab.functional:
    what is the imported module or ``module.name``; and the names bound to functional modules."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("normlab.functional"):
                    found.append((node.lineno, alias.name))
                    if alias.asname:
                        bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub.startswith("normlab.functional") and sub in MODULES:  # a module
                    found.append((node.lineno, sub))
                    bound[alias.asname or alias.name] = sub
                elif target.startswith("normlab.functional"):
                    found.append((node.lineno, sub))
    for node in ast.walk(tree):  # NF._x on a name bound to a functional module
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((node.lineno, f"{bound[node.value.id]}.{node.attr}"))
    return found


def test_layers_import_no_private_name_of_functional():
    """Layers use only functional's public names (``from ..functional import _x``, ``NF._x`` and
    ``normlab.functional._module`` are private): the math and its helpers live in functional."""
    offenders = {
        name: [f"line {line}: {what}" for line, what in _functional_imports(name, path)
               if any(part.startswith("_") and not part.startswith("__") for part in what.split("."))]
        for name, path in MODULES.items() if name.startswith("normlab.layers")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_private_import_check_sees_each_form(tmp_path):
    """The check above is no check that cannot fail: each private form is found."""
    sources = {
        "from ..functional import _numerics": "normlab.functional._numerics",
        "from ..functional._numerics import finite_flag": "normlab.functional._numerics.finite_flag",
        "from ..functional import _x": "normlab.functional._x",
        "from .. import functional as NF\nNF._mask_view": "normlab.functional._mask_view",
        "import normlab.functional._dispatch": "normlab.functional._dispatch",
    }
    for source, expected in sources.items():
        path = tmp_path / "fake.py"
        path.write_text(source + "\n")
        found = [what for _, what in _functional_imports("normlab.layers.fake_for_structure_test", path)]
        assert expected in found, (source, found)


LINE_LIMIT = 600


def test_no_source_file_over_600_lines():
    """No module is longer than 600 lines, except reference.py (the oracle: every formula side
    by side) and the functional package's largest module; each says why in its docstring (it
    mentions the 600-line limit)."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    functional = {name: size for name, size in sizes.items() if name.startswith("normlab.functional.")}
    allowed = {"normlab.reference", max(functional, key=functional.get)}
    assert {name: size for name, size in sizes.items() if size > LINE_LIMIT and name not in allowed} == {}
    for name in allowed:
        if sizes[name] > LINE_LIMIT:
            doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
            assert "600 lines" in doc, f"{name} has {sizes[name]} lines and its docstring does not say why"


def _defining(pattern: str) -> list[str]:
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(name for name, path in MODULES.items()
                  if not name.startswith("normlab.lab") and regex.search(path.read_text()))


@pytest.mark.parametrize(
    "what, pattern, home",
    [
        ("the half-precision dtype set", r"\(torch\.float16, torch\.bfloat16\)|\(torch\.bfloat16, torch\.float16\)",
         "normlab.stats"),
        ("the finite-statistics flag", r"def _?finite_flag\(", "normlab.functional._numerics"),
        ("the precision condition", r"^_?PRECISE_CONDITION\s*=", "normlab.functional._numerics"),
        ("the fewer-than-two-values message", r"more than one value per channel to compute",
         "normlab.functional._numerics"),
        ("the mask check", r"mask must be a bool tensor, True at valid positions", "normlab.functional._numerics"),
        ("moments pooled across processes", r"\.all_gather\(", "normlab.functional.sync"),
        ("the running update kept where not finite", r"def _?guarded_update\(", "normlab.functional._numerics"),
    ],
    ids=["half-dtypes", "finite-flag", "condition", "count-message", "mask-message", "moments", "guarded-update"],
)
def test_each_repeat_named_in_issue_12_has_one_home(what, pattern, home):
    assert _defining(pattern) == [home], what


def test_autograd_functions_live_in_functional():
    """Layers hold state, checks and the mode; every autograd Function is math, in functional."""
    assert [name for name in _defining(r"\(torch\.autograd\.Function\)") if not name.startswith("normlab.functional")] == []
