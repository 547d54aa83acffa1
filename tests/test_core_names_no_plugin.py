"""Nothing in ``specforge_core`` imports a bundled plugin, and no module names a bundled component
in its code (string literals outside docstrings), so every bundled plugin is replaceable.

Walks every .py file under specforge_core with ``ast`` (not only the package import). The known
remaining places that still name a bundled component are listed in ``KNOWN`` with the reason; the
test fails on any new one, and also when a listed one is gone (so the list only shrinks).
The other import rules of the core (no cycle, data and evaluation import no run/pipeline) are
``test_core_import_rules.py``; the plugins' side (public modules only) is ``test_plugin_imports.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "specforge_core"


def bundled_packages() -> set[str]:
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["specforge"]
    return {v.split(".")[0].split(":")[0] for v in eps.values()}


def bundled_names() -> set[str]:
    """Component names the bundled plugins register (from the live registry), minus words that are
    ordinary English/Python in the core ('local' pipeline, 'constant'...)."""
    from specforge_core.registry import get_registry

    names = {c.name for c in get_registry().components()}
    return names - {"local", "constant", "linear"}


# (module path relative to specforge_core, name) -> why it is still there
KNOWN = {
    # component selectors default to empty (a plugin declares the default: hookspecs.register_defaults)
    ("config/schema.py", "hf"): "eval.engine default: the core's own in-process eval engine (not a plugin)",
    ("pipeline/ray_pipeline.py", "shm"): "the Ray pipeline's default multi-process store",
    ("pipeline/ray_pipeline.py", "mooncake"): "message naming the multi-node store",
    ("evaluation/cli.py", "vllm"): "eval's aux-id convention choices",
    ("evaluation/cli.py", "hf"): "eval's in-process engine",
    ("evaluation/evaluate.py", "hf"): "eval's in-process engine",
    ("evaluation/report.py", "hf"): "eval's in-process engine",
    ("evaluation/engines.py", "hf"): "eval's in-process engine",
    ("evaluation/settings.py", "hf"): "eval's in-process engine (the default of [eval] engine)",
    ("config/schema.py", "llama-eagle3"): "the one-line error for the old training.ttt_length says where it moved",
    ("data/features.py", "disk"): "the English phrase 'changed on disk', not the store",
}


def code_strings(tree: ast.AST) -> list[str]:
    """String constants that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def mentions(text: str, name: str) -> bool:
    import re

    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def test_no_core_module_imports_a_bundled_plugin():
    packages = bundled_packages()
    assert {"specforge_defaults", "specforge_llama_eagle3", "specforge_fsdp2"} <= packages
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                mods = [str(node.args[0].value)]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in mods if m.split(".")[0] in packages]
    assert not offenders, "core imports a bundled plugin:\n" + "\n".join(offenders)


def test_no_core_module_names_a_bundled_component():
    names = bundled_names()
    assert {"llama-eagle3", "forward-kl", "fsdp2"} <= names
    found = set()
    for path in sorted(CORE.rglob("*.py")):
        rel = str(path.relative_to(CORE))
        for s in code_strings(ast.parse(path.read_text(), str(path))):
            found |= {(rel, n) for n in names if mentions(s, n)}
    new = sorted(found - set(KNOWN))
    assert not new, "core code names bundled components:\n" + "\n".join(f"{m}: {n!r}" for m, n in new)
    gone = sorted(set(KNOWN) - found)
    assert not gone, f"no longer named, drop from KNOWN: {gone}"
