"""A broken third-party plugin is reported in one line and skipped; every other plugin still works
(issue 18, newcomer friction). The plugin is a real installed distribution on sys.path."""

from __future__ import annotations

import importlib
import logging
import sys

import pytest

from specforge_core import cli
from specforge_core.registry import RegistryError, registry_from


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A dist-info whose ``specforge`` entry point imports a module that raises."""
    (tmp_path / "specforge_broken_demo.py").write_text("raise ImportError('needs libfoo 9, found 8')\n")
    info = tmp_path / "specforge_broken_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: specforge-broken-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[specforge]\nbroken-demo = specforge_broken_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield "broken-demo"
    sys.modules.pop("specforge_broken_demo", None)


def test_broken_plugin_is_skipped_with_one_warning(broken_plugin, caplog):
    with caplog.at_level(logging.WARNING, logger="specforge_core.registry"):
        reg = registry_from([])
    [(info, why)] = reg.broken
    assert info.name == broken_plugin and info.distribution == "specforge-broken-demo"
    assert "needs libfoo 9" in why
    assert [r.getMessage() for r in caplog.records if "broken-demo" in r.getMessage()] == [
        f"{why}; continuing without it"]
    assert "forward-kl" in reg.names("loss")  # the bundled plugins still load
    with pytest.raises(RegistryError, match="Not loaded: plugin 'broken-demo'"):
        reg.get("loss", "needs-broken-demo")


def test_specforge_plugins_lists_it_as_broken(broken_plugin, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    import specforge_core.registry as registry_mod

    monkeypatch.setattr(registry_mod, "_REGISTRY", None, raising=False)
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken-demo" in out and "BROKEN" in out and "llama-eagle3" in out
