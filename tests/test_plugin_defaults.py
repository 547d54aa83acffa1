"""Config defaults supplied by plugins: the core schema's component selectors are empty, and the
loader fills in the component a plugin declares the default of its kind (``register_defaults``).
Exactly one declaration per kind: two, none, or one naming an unregistered component is a clear
error when (and only when) the default is needed."""

from __future__ import annotations

import attrs
import pytest

from specforge_core import hookimpl
from specforge_core.components import KINDS
from specforge_core.config import ConfigError, dump_toml, load_config
from specforge_core.config.schema import SpecforgeConfig
from specforge_core.registry import Registry, RegistryError, registry_from


class MyLoss:
    """The smallest object the ``Loss`` contract accepts (the registry checks what it builds)."""

    def prepare(self, final_hidden, head):
        return final_hidden

    def __call__(self, draft_hidden, draft_head, prepared, target_rows, valid):
        raise AssertionError("not called here")


class MyLossPlugin:
    """An outside plugin: one loss, declared the default loss."""

    @hookimpl
    def register_losses(self, register):
        register("my-loss", lambda options: MyLoss(), description="test loss")

    @hookimpl
    def register_defaults(self, default):
        default("loss", "my-loss")


class Declares:
    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    @hookimpl
    def register_defaults(self, default):
        default(self.kind, self.name)


def _field_default(section: str, selector: str):
    from specforge_core.config.schema import CORE_SECTIONS

    return next(a for a in attrs.fields(CORE_SECTIONS[section]) if a.name == selector).default


def test_schema_names_no_component_and_the_loader_fills_the_declared_ones():
    reg = registry_from([])
    cfg = load_config(registry=reg)
    for kind, (section, selector) in KINDS.items():
        assert _field_default(section, selector) == "", f"{section}.{selector} has a core default"
        declared = reg.default_name(kind)
        assert declared in reg.names(kind)
        assert getattr(getattr(cfg, section), selector) == declared  # resolved, not empty
        assert f'{selector} = "{declared}"' in dump_toml(cfg)  # `config show` prints the name
    # an explicit selector wins, and its options table is the one of the chosen component
    cfg = load_config(overrides=["training.scheduler=linear"], registry=reg)
    assert cfg.training.scheduler == "linear" and cfg.options("training", "linear") is not None


def test_an_outside_plugin_can_supply_the_default():
    reg = Registry()  # no entry points: only this plugin
    reg.register_plugin(MyLossPlugin(), "mine")
    assert reg.default_name("loss") == "my-loss"
    assert isinstance(reg.create_for(SpecforgeConfig(), "loss"), MyLoss)  # unset selector
    assert reg.get("loss", "").name == "my-loss"
    from specforge_core.config.reference import render_reference

    text = render_reference(reg)  # the reference lists what is installed, at generation time
    assert '| `loss` | a string | `"my-loss"` (declared by a plugin) |' in text and "Installed: `my-loss`." in text


def test_two_declarations_are_an_error_naming_both_only_when_needed():
    reg = registry_from([("mine", MyLossPlugin())])
    with pytest.raises(RegistryError) as err:
        reg.default_name("loss")
    msg = str(err.value)
    assert "'forward-kl' by plugin 'defaults'" in msg and "'my-loss' by plugin 'mine'" in msg
    assert "set training.loss explicitly" in msg
    with pytest.raises(ConfigError) as cerr:
        load_config(registry=reg)
    assert cerr.value.key == "training.loss"
    # an explicit selector needs no default
    assert load_config(overrides=["training.loss=my-loss"], registry=reg).training.loss == "my-loss"


def test_no_declaration_and_an_unregistered_declaration_are_errors():
    reg = Registry()
    reg.register_plugin(type("OnlyLoss", (), {"register_losses": hookimpl(
        lambda self, register: register("x", lambda o: o))})(), "only")
    with pytest.raises(RegistryError, match=r"training.loss is unset and no installed plugin declares a default "
                                            r"loss; set it to one of: x"):
        reg.get("loss", "")
    reg.register_plugin(Declares("loss", "nope"), "typo")
    with pytest.raises(RegistryError, match=r"declared default 'nope' \(plugin 'typo'\) is not registered"):
        reg.default_name("loss")
    bad = Registry()
    bad.register_plugin(Declares("widget", "w"), "bad")
    assert bad.names("loss") == []  # the plugin is left out, named, with the reason
    [(info, why)] = bad.broken
    assert info.name == "bad" and "unknown kind 'widget'" in why


def test_plugins_command_marks_the_declared_defaults():
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "specforge_core.cli", "plugins"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="200"), check=True).stdout
    reg = registry_from([])
    for kind in KINDS:
        row = next(line for line in out.splitlines() if f" {kind} " in line and "(default)" in line)
        assert f"{reg.default_name(kind)} (default)" in row
    assert out.count("(default)") == len(KINDS) + 1  # one per kind, plus the caption
