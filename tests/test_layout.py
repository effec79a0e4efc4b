"""The house's layout holds: no import cycles, data flowing one way, rooms of a readable size.

Imports are read from the source (``ast``), every ``import`` and ``from ... import`` anywhere in
a module, function-local ones included, so a cycle cannot hide behind a deferred import. A
``from package import name`` where ``name`` is a submodule counts as an import of that
submodule. Importing a submodule also runs its package's ``__init__``; that implicit edge is
not counted (a package's ``__init__`` re-exporting its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "backends", "bench", "reports")
# Which top-level packages each may import: data flows model -> backends -> bench, and the
# renderers read stored records (the CLI, at the top of bench, may call them).
ALLOWED = {
    "model": {"model"},
    "backends": {"backends", "model"},
    "reports": {"reports"},
    "bench": {"bench", "backends", "model", "reports"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its source."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import bench.cell.x` -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_function_local_imports_included():
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_data_flows_one_way():
    wrong = sorted(f"{m} imports {t}" for m, targets in graph().items() for t in targets
                   if t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not wrong, wrong


def test_only_the_cli_renders_with_reports():
    """bench's harness does not need the renderers; only its command line prints them."""
    users = sorted(m for m, targets in graph().items()
                   if m.startswith("bench") and not m.startswith("bench.cli") and any(t.startswith("reports") for t in targets))
    assert not users, users


def test_bench_is_laid_out_by_concept():
    direct = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    assert len(direct) <= 8, direct
    for room in ("cli", "scenarios", "executors", "results", "machine"):
        assert (ROOT / "bench" / room / "__init__.py").is_file(), room


def test_cli_modules_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "bench" / "cli").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


@pytest.mark.parametrize("package", sorted({m for m in modules() if modules()[m].name == "__init__.py"}))
def test_every_package_says_what_it_holds(package):
    doc = ast.get_docstring(ast.parse(modules()[package].read_text()))
    assert doc and len(doc) > 80, f"{package}/__init__.py needs a docstring saying what it holds and may import"
