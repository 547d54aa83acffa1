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


def _install(tmp_path, monkeypatch, module: str, source: str, ep_name: str) -> None:
    (tmp_path / f"{module}.py").write_text(source)
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[specforge]\n{ep_name} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


EXITS_AT_IMPORT = "import sys\nsys.exit(3)\n"
RAISES_IN_HOOK = """
from specforge_core import hookimpl

@hookimpl
def register_losses(register):
    register("fine-loss", lambda options: None)
    raise RuntimeError("cannot find libfoo")
"""


@pytest.mark.parametrize("source, expect", [
    (EXITS_AT_IMPORT, "failed to import: called sys.exit(3)"),
    (RAISES_IN_HOOK, "its hook register_losses raised RuntimeError: cannot find libfoo"),
], ids=["sys-exit-at-import", "raising-register-hook"])
def test_plugin_that_exits_or_raises_is_left_out_and_named(tmp_path, monkeypatch, capsys, source, expect):
    module = f"specforge_bad_{abs(hash(expect)) % 10**6}"
    _install(tmp_path, monkeypatch, module, source, "bad-demo")
    try:
        reg = registry_from([])
        [(info, why)] = reg.broken
        assert info.name == "bad-demo" and why.startswith("plugin 'bad-demo'") and expect in why, why
        assert "\n" not in why
        assert "forward-kl" in reg.names("loss") and "fine-loss" not in reg.names("loss")  # left out whole
        with pytest.raises(RegistryError, match=r"Not loaded: plugin 'bad-demo'"):
            reg.get("loss", "fine-loss")

        # the CLI: `specforge plugins` lists it with its one-line error; other commands still work
        import specforge_core.registry as registry_mod

        monkeypatch.setenv("COLUMNS", "400")
        monkeypatch.setattr(registry_mod, "_REGISTRY", None, raising=False)
        assert cli.main(["plugins"]) == 0
        out = capsys.readouterr().out
        [row] = [line for line in out.splitlines() if "bad-demo" in line]
        assert "BROKEN" in row and expect in row, out
        assert cli.main(["config", "show"]) == 0
        assert "[training]" in capsys.readouterr().out
        assert cli.main(["config", "show", "training.loss=fine-loss"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Not loaded: plugin 'bad-demo'" in err, err
    finally:
        sys.modules.pop(module, None)


def test_raising_eval_engine_hook_leaves_its_plugin_out():
    from types import SimpleNamespace

    from specforge_core import hookimpl
    from specforge_core.evaluation.engines import eval_engines

    @hookimpl
    def register_eval_engines(register):
        register("half-engine", lambda request: None)
        raise ValueError("engine binary missing")

    reg = registry_from([("engine-demo", SimpleNamespace(register_eval_engines=register_eval_engines))])
    assert "half-engine" not in eval_engines(reg) and "hf" in eval_engines(reg)
    [(info, why)] = reg.broken
    assert info.name == "engine-demo" and "register_eval_engines raised ValueError: engine binary missing" in why


def test_sys_exit_plugin_in_a_fresh_cli_process(tmp_path):
    """As a user meets it: a fresh ``specforge`` process finds the plugin through its entry point."""
    import os
    import subprocess

    (tmp_path / "specforge_exits_demo.py").write_text(EXITS_AT_IMPORT)
    info = tmp_path / "specforge_exits_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: specforge-exits-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[specforge]\nexits-demo = specforge_exits_demo\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "400"}

    def cli_run(*args):
        return subprocess.run([sys.executable, "-m", "specforge_core.cli", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    plugins = cli_run("plugins")
    assert plugins.returncode == 0, plugins.stderr
    [row] = [line for line in plugins.stdout.splitlines() if "exits-demo" in line]
    assert "BROKEN" in row and "called sys.exit(3)" in row
    show = cli_run("config", "show")
    assert show.returncode == 0 and "[training]" in show.stdout
    assert "plugin 'exits-demo'" in show.stderr and len(show.stderr.strip().splitlines()) == 1  # one warning
