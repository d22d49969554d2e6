"""Imports point down the layer table of docs/ARCHITECTURE.md and never close a cycle.

The table is parsed from the doc, so the doc and this test cannot disagree. Every
``import`` of a qqq_compile module counts, wherever it sits (module level, inside a
function, under ``TYPE_CHECKING``): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "qqq_compile"
DOC = REPO / "docs" / "ARCHITECTURE.md"
ROOT = "qqq_compile"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(name: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, lazy)`` for every qqq_compile import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy_lines = {
        n.lineno
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(fn)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, node.lineno, node.lineno in lazy_lines))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    out.append((alias.name, node.lineno, node.lineno in lazy_lines))
    return out


def doc_tables() -> tuple[dict[str, int], dict[tuple[str, str], str]]:
    """(entry → layer, (from, to) → reason) from the doc's "Layers" section. An entry is a
    module (``graph``) or a package (``kernels/``: the package and all its modules)."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    exceptions: dict[tuple[str, str], str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for entry in re.findall(r"`([^`]+)`", cells[1]):
                layers[entry] = int(cells[0])
        elif len(cells) == 3 and cells[0].startswith("`") and cells[1].startswith("`"):
            exceptions[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2]
    return layers, exceptions


LAYERS, EXCEPTIONS = doc_tables()


def entry_of(module: str) -> str | None:
    """The table entry covering ``module`` (``qqq_compile.compiler.passes.gptq`` → ``passes/``)."""
    rel = module.removeprefix(ROOT).lstrip(".") or "__init__"
    if rel in LAYERS:
        return rel
    parts = rel.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]).replace(".", "/") + "/" in LAYERS:
            return ".".join(parts[:i]).replace(".", "/") + "/"
    return None


def edges() -> list[tuple[str, str, int, bool]]:
    return [(m, t, line, lazy) for m in sorted(MODULES) for t, line, lazy in imports(m) if t != m]


def test_the_doc_table_parses():
    names = {"config", "graph/", "compiler.pipeline", "compiler/passes/", "compiler.driver", "runtime.compiled"}
    assert names | {"artifact/", "compiler.api", "cli/"} <= set(LAYERS)
    assert LAYERS["config"] < LAYERS["graph/"] < LAYERS["compiler.pipeline"] < LAYERS["compiler/passes/"]
    assert LAYERS["compiler/passes/"] < LAYERS["compiler.driver"] < LAYERS["runtime.compiled"] < LAYERS["artifact/"]
    assert LAYERS["artifact/"] < LAYERS["compiler.api"] < LAYERS["cli/"]


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if entry_of(m) is None)
    assert not missing, f"modules missing from the layer table of {DOC.name}: {missing}"
    # Entries may name modules that do not exist yet (cache, runtime, calib): only real ones are checked.


def test_imports_point_down():
    bad = []
    for m, t, line, lazy in edges():
        src, dst = entry_of(m), entry_of(t)
        if src is None or dst is None or LAYERS[dst] <= LAYERS[src]:
            continue
        reason = EXCEPTIONS.get((src.rstrip("/"), dst.rstrip("/")))
        if reason is not None and lazy:
            continue  # a listed thin entry (a method whose work lives higher up), imported lazily
        where = f"{MODULES[m].relative_to(REPO)}:{line}"
        bad.append(f"{where} {m} (layer {LAYERS[src]}) imports {t} (layer {LAYERS[dst]}){' lazily' if lazy else ''}")
    assert not bad, "imports pointing up the layer table:\n" + "\n".join(bad)


def test_listed_exceptions_are_still_needed():
    used = set()
    for m, t, _, lazy in edges():
        src, dst = entry_of(m), entry_of(t)
        if src and dst and LAYERS[dst] > LAYERS[src] and lazy:
            used.add((src.rstrip("/"), dst.rstrip("/")))
    stale = sorted(set(EXCEPTIONS) - used)
    assert not stale, f"exceptions listed in {DOC.name} that no import needs any more: {stale}"


def test_passes_never_import_each_other():
    bad = [
        f"{m} imports {t}"
        for m, t, _, _ in edges()
        if m.startswith(f"{ROOT}.compiler.passes.") and t.startswith(f"{ROOT}.compiler.passes.")
    ]
    assert not bad, bad


def test_no_import_cycles():
    g = nx.DiGraph()
    for m, t, _, lazy in edges():
        # A package's __init__ re-exporting its own submodules is the facade, not a dependency.
        if MODULES[m].name == "__init__.py" and t.startswith(m + "."):
            continue
        src, dst = entry_of(m), entry_of(t)
        if lazy and src and dst and (src.rstrip("/"), dst.rstrip("/")) in EXCEPTIONS:
            continue  # a listed thin entry: the one edge allowed to point up (and so to close a loop)
        g.add_edge(m, t)
    cycles = sorted(sorted(c) for c in nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize(
    "module", ["qqq_compile.compiler.block_runner", "qqq_compile.compiler.blockwise", "qqq_compile.compiler.streaming"]
)
def test_the_old_back_edges_are_gone(module):
    """runner → streaming → api, blockwise → api: the edges that closed the ten-module cycle."""
    targets = {t for t, _, _ in imports(module)}
    assert "qqq_compile.compiler.api" not in targets and "qqq_compile.compiler.streaming" not in (targets - {module})
