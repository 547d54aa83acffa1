"""Plugins import only the public core modules (``specforge_core.plugin_api`` lists them): the
bundled plugins and the example plugins are walked with ``ast`` (function-local imports included),
and every name ``plugin_api`` offers resolves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {
    "specforge_core",
    "specforge_core.api",
    "specforge_core.components",
    "specforge_core.config",
    "specforge_core.config.fields",
    "specforge_core.types",
    "specforge_core.plugin_api",
}


def plugin_files() -> list[Path]:
    files = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples" / "plugins").rglob("*.py"))
    assert any("specforge_llama_eagle3" in str(f) for f in files) and any("mlp_head" in str(f) for f in files)
    return files


def core_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from specforge_core import x`` where x is a submodule counts as importing it
            if node.module == "specforge_core":
                found += [(node.lineno, f"specforge_core.{a.name}") for a in node.names if a.name != "hookimpl"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return sorted((line, m) for line, m in found if m.split(".")[0] == "specforge_core")


def test_plugins_import_only_public_core_modules():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in plugin_files() for line, module in core_imports(path) if module not in PUBLIC]
    assert not offenders, ("plugins import internal core modules (use specforge_core.plugin_api; add what a "
                           "plugin legitimately needs there):\n" + "\n".join(offenders))


def test_the_walk_sees_function_local_imports(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("def f():\n    from specforge_core.training.trainer import Trainer\n"
                 "import specforge_core.plugin_api\nfrom specforge_core import registry\n")
    assert [m for _l, m in core_imports(f)] == ["specforge_core.training.trainer", "specforge_core.plugin_api",
                                                 "specforge_core", "specforge_core.registry"]
    assert [m for _l, m in core_imports(f) if m not in PUBLIC] == ["specforge_core.training.trainer",
                                                                    "specforge_core.registry"]


def test_every_plugin_api_name_resolves():
    from specforge_core import plugin_api

    for name in plugin_api.__all__:
        assert getattr(plugin_api, name) is not None, name
    with pytest.raises(AttributeError, match="plugin_api has no 'nope'"):
        plugin_api.nope  # noqa: B018
