"""The defaults plugin registers its components through the entry point, with documented options."""

from __future__ import annotations

import attrs
import torch

from specforge_core.components import TrainingStrategy, TransferStore, TransferStoreProvider
from specforge_core.config.fields import help_of
from specforge_core.config.schema import SpecforgeConfig
from specforge_core.registry import get_registry

EXPECTED = {
    "loss": ["forward-kl"],
    "lr_scheduler": ["constant", "linear", "cosine"],
    "transfer_store": ["local", "shm"],
    "training_strategy": ["local"],
}


def test_components_registered_with_help():
    reg = get_registry()
    for kind, names in EXPECTED.items():
        for name in names:
            comp = reg.get(kind, name)
            assert comp.plugin.name == "defaults"
            assert comp.description
            if comp.config_class is not None:
                for field in attrs.fields(comp.config_class):
                    assert help_of(field), f"{kind} {name}: option {field.name} has no help"
                comp.config_class()  # every field has a default


def test_built_through_registry(tmp_path):
    reg = get_registry()
    provider = reg.create("transfer_store", "local")
    assert isinstance(provider, TransferStoreProvider)
    handle = provider.start("r")
    assert isinstance(provider.connect(handle), TransferStore)
    provider.stop(handle)

    config = SpecforgeConfig()
    strategy = reg.create_for(config, "training_strategy", config)
    assert isinstance(strategy, TrainingStrategy)  # every required member (components.members)
    assert reg.create_for(config, "lr_scheduler", 10, 2)(1) == 1.0  # default cosine, end of warmup

    loss = reg.create_for(config, "loss")  # default forward-kl
    h, w = torch.randn(4, 8), torch.randn(6, 8)
    # the loss contract: prepare once per micro-batch, then one call per prediction group
    out = loss(h, w, loss.prepare(h, w), torch.arange(4), torch.ones(4, dtype=torch.bool))
    assert int(out.correct) == 4 and int(out.count) == 4
