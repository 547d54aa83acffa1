"""Plugin discovery through entry points, selection by name, unknown and duplicate names."""

import importlib.metadata as md
import sys
import types

import attrs
import pytest

from specforge_core import hookimpl
from specforge_core.config import load_config, option
from specforge_core.config.loader import ConfigError
from specforge_core.registry import ENTRY_POINT_GROUP, Registry, RegistryError, get_registry, registry_from

BUNDLED = {"defaults", "llama-eagle3", "hf-backend", "sglang-backend", "mooncake-rdma", "fsdp2"}


def test_bundled_plugins_are_found_through_entry_points():
    names = {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}
    assert BUNDLED <= names
    reg = Registry()
    reg.load_entry_points()
    loaded = {p.name: p for p in reg.plugins}
    assert BUNDLED <= set(loaded)
    assert loaded["hf-backend"].distribution == "specforge-train"
    # every bundled component comes from an entry-point plugin, none from a core import
    assert all(c.plugin.name in loaded for c in reg.components())


def test_core_import_loads_no_plugin_and_no_heavy_backend():
    import subprocess

    code = (
        "import sys, specforge_core, specforge_core.config, specforge_core.registry, specforge_core.cli;"
        "bad=[m for m in sys.modules if m.split('.')[0] in "
        "('sglang','mooncake','ray','wandb') or m.startswith('specforge_') and m!='specforge_core' "
        "and not m.startswith('specforge_core.')];print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@attrs.define
class GammaOptions:
    gamma: float = option(0.5, "decay")


def _plugin(name: str, kind_hook: str = "register_lr_schedulers"):
    mod = types.SimpleNamespace()

    def impl(register):
        register(name, lambda options, total, warmup: (lambda step: options.gamma), config=GammaOptions)

    impl.__name__ = kind_hook
    setattr(mod, kind_hook, hookimpl(impl))
    return mod


def test_select_in_process_plugin_by_name_from_toml(tmp_path):
    reg = registry_from([("my-sched", _plugin("halving"))])
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[training]\nscheduler = "halving"\n[training.halving]\ngamma = 0.25\n')
    cfg = load_config([cfg_file], registry=reg)
    assert cfg.options("training", "halving") == GammaOptions(gamma=0.25)
    fn = reg.create_for(cfg, "lr_scheduler", 10, 0)
    assert fn(3) == 0.25


def test_unknown_component_lists_registered_names(tmp_path):
    reg = registry_from([("my-sched", _plugin("halving"))])
    with pytest.raises(RegistryError) as err:
        reg.get("lr_scheduler", "halvng")
    msg = str(err.value)
    assert "halving" in msg and "cosine" in msg and "Did you mean 'halving'" in msg
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[training]\nscheduler = "nope"\n')
    with pytest.raises(ConfigError) as err2:
        load_config([cfg_file], registry=reg)
    assert str(cfg_file) in str(err2.value) and "training.scheduler" in str(err2.value)
    assert "registered: " in str(err2.value) and "cosine" in str(err2.value)


def test_duplicate_names_name_both_plugins():
    reg = registry_from([("first-plugin", _plugin("dup")), ("second-plugin", _plugin("dup"))], with_entry_points=False)
    with pytest.raises(RegistryError) as err:
        reg.components()
    assert "first-plugin" in str(err.value) and "second-plugin" in str(err.value) and "'dup'" in str(err.value)


def test_component_name_may_not_shadow_core_field(tmp_path):
    # [training.lr] would be ambiguous: a config selecting it is refused, naming the plugin
    reg = registry_from([("bad", _plugin("lr"))])
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[training]\nscheduler = "lr"\n')
    with pytest.raises(ConfigError, match=r"plugin 'bad': lr_scheduler name 'lr' clashes with the core field "
                                          r"\[training\].lr"):
        load_config([cfg_file], registry=reg)
    assert load_config(registry=reg).training.scheduler != "lr"  # unselected, it harms no one


def test_broken_plugin_names_itself(monkeypatch):
    ep = md.EntryPoint(name="broken", value="no_such_module_xyz", group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(md, "entry_points", lambda group: [ep])
    reg = Registry()
    reg.load_entry_points()  # skipped with a warning, not raised (tests/test_errors_broken_plugin.py)
    [(info, why)] = reg.broken
    assert info.name == "broken" and "plugin 'broken'" in why and "failed to import" in why


def test_every_kind_has_a_bundled_default():
    reg = get_registry()
    cfg = load_config()
    for kind in ("draft_algorithm", "target_backend", "transfer_store", "loss", "lr_scheduler", "training_strategy"):
        from specforge_core.components import KINDS

        section, selector = KINDS[kind]
        assert getattr(getattr(cfg, section), selector) in reg.names(kind), kind
