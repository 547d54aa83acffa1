"""Import rules of ``specforge_core``, read from the ASTs of every module (function-local imports
included, so a circle hidden behind a late import is still a circle):

- no import cycle between core modules;
- ``data/`` imports nothing of ``pipeline/``, ``training/``, ``run/``;
- ``evaluation/`` imports nothing of ``run/``, ``pipeline/``.

(That the core imports and names no bundled plugin is ``test_core_names_no_plugin.py``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "specforge_core"

# package prefix -> packages it must not import
LAYERS = {
    "specforge_core.data": ("specforge_core.pipeline", "specforge_core.training", "specforge_core.run"),
    "specforge_core.evaluation": ("specforge_core.run", "specforge_core.pipeline"),
}

# Cycles still present, each as the sorted tuple of its modules: the list may only shrink (the test
# fails when one is gone, so it is dropped here). Keep it empty.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = CORE, root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(package.rglob("*.py"))}


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Core modules ``path`` (module ``name``) imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # ``from pkg import submodule`` imports the submodule; ``from mod import name``, the module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for t in targets:
            # the deepest known module the name refers to (``from pkg import submodule`` included)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # its own packages ran first anyway
                out.add(t)
    return out


def graph(package: Path = CORE, root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(package, root)
    edges = {name: imports_of(path, name, known) for name, path in known.items()}
    # importing a.b.c first runs the packages a.b and a: those are imported too
    for name in edges:
        for t in list(edges[name]):
            parent = t.rpartition(".")[0]
            while parent in known and parent != name and not name.startswith(parent + "."):
                edges[name].add(parent)
                parent = parent.rpartition(".")[0]
    return edges


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(tuple(sorted(comp)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def describe(comp: tuple[str, ...], edges: dict[str, set[str]]) -> str:
    inside = set(comp)
    return "; ".join(f"{a} -> {', '.join(sorted(edges[a] & inside))}" for a in comp)


def test_no_import_cycle_in_the_core():
    edges = graph()
    found = set(cycles(edges))
    new = sorted(found - KNOWN_CYCLES)
    assert not new, "import cycles in specforge_core:\n" + "\n".join(describe(c, edges) for c in new)
    gone = sorted(KNOWN_CYCLES - found)
    assert not gone, f"no longer a cycle, drop from KNOWN_CYCLES: {gone}"


def test_layers_import_only_downward():
    edges = graph()
    bad = [f"{m} imports {t}" for m, targets in edges.items() for layer, banned in LAYERS.items()
           if m == layer or m.startswith(layer + ".") for t in sorted(targets)
           if any(t == b or t.startswith(b + ".") for b in banned)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_graph_sees_late_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    edges = graph(pkg, tmp_path)
    assert "pkg.sub.b" in edges["pkg.a"] and "pkg.a" in edges["pkg.sub.b"]
    assert cycles(edges) == [("pkg.a", "pkg.sub.b")]


def test_no_import_cycle_between_benchmarks():
    # benchmarks/ puts itself on sys.path: its modules import each other by bare name
    edges = graph(ROOT / "benchmarks", ROOT / "benchmarks")
    assert "draft_step" in edges.get("varlen_step", set())  # the walk sees them
    found = cycles(edges)
    assert not found, "import cycles in benchmarks/:\n" + "\n".join(describe(c, edges) for c in found)
