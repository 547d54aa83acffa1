"""Algorithms own their default aux layers: ``model.aux_layers`` unset means the draft algorithm's
``FeatureSpec.default_aux_layers`` for the target, in plan/validate, the pipelines and export
(``plan.with_aux_layers``) and eval (a proposer whose export names no layers). The example
algorithm's end-to-end run is in test_example_algorithm_eval.py; here DFlash's and a stub's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from specforge_core import hookimpl
from specforge_core.components import FeatureSpec
from specforge_core.config import load_config
from specforge_core.registry import registry_from

ROOT = Path(__file__).resolve().parents[1]
DFLASH = str(ROOT / "configs" / "quickstart-dflash.toml")


def zlab_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's layer choice written another way: evenly spaced 0-based layer outputs 1..L-3
    (np.linspace + round), the middle one for one layer; +1 = HF hidden_states index."""
    if num_draft_layers == 1:
        return [num_target_layers // 2 + 1]
    return [int(i) + 1 for i in np.round(np.linspace(1, num_target_layers - 3, num_draft_layers))]


@pytest.mark.parametrize("L,n", [(8, 2), (36, 5), (28, 3), (32, 1), (30, 4)])
def test_dflash_default_is_zlabs_spread(L, n):
    from specforge_dflash.plugin import DFlashAlgorithm, DFlashOptions

    assert DFlashAlgorithm(DFlashOptions(num_layers=n)).features.default_aux_layers(L) == zlab_ids(L, n)
    # z-lab's Qwen3-8B drafts (36 layers, 5 draft layers) ship target_layer_ids [1, 9, 17, 25, 33]
    assert zlab_ids(36, 5) == [2, 10, 18, 26, 34]


def test_plan_sizes_dflash_with_its_own_layers():
    from specforge_core.plan import build_plan, with_aux_layers

    cfg = load_config([DFLASH])
    assert cfg.model.aux_layers == []
    plan = build_plan(cfg)
    L, H = plan["target"]["num_hidden_layers"], plan["target"]["hidden_size"]
    assert plan["aux_layers"] == zlab_ids(L, 2) != [2, L // 2, L - 3]
    assert with_aux_layers(cfg).model.aux_layers == plan["aux_layers"]
    explicit = build_plan(load_config([DFLASH], ["model.aux_layers=[2,4,5]"]))
    # the draft's fc takes n_aux * H features: one aux layer fewer, H*H fewer parameters
    assert explicit["draft_trainable"] - plan["draft_trainable"] == H * H
    assert plan["n_aux"] == 2 and explicit["n_aux"] == 3


class StubProposer:
    """Meets the Proposer contract (eval checks it); never asked to draft here."""

    aux_layers = None

    def begin(self, prompts): ...
    def observe(self, tokens, features): ...
    def propose(self, k): ...
    def keep(self, rows): ...


class Stub:
    """A draft algorithm whose default layers are invalid for small targets, with a proposer whose
    export names no layers."""

    features = FeatureSpec(default_aux_layers=lambda L: [1, L + 1])

    def proposer(self, export_dir, target, device):
        return StubProposer()

    # the rest of the contract (the registry checks it): never called here
    def build(self, target, vocab, weights=None):
        raise NotImplementedError

    count_targets = objective = summarize = export = plan = build


class StubPlugin:
    @hookimpl
    def register_draft_algorithms(self, register):
        register("stub", lambda options, config=None: Stub())


def test_eval_takes_the_algorithms_default_when_the_export_names_none():
    from specforge_core.evaluation.proposers import load_proposer

    reg = registry_from([("stub", StubPlugin())])
    proposer = load_proposer("-", SimpleNamespace(num_layers=12), "cpu", name="stub", registry=reg)
    assert proposer.aux_layers == [1, 13]


def test_an_invalid_default_is_refused_naming_the_algorithm():
    from specforge_core.plan import with_aux_layers

    reg = registry_from([("stub", StubPlugin())])
    cfg = load_config(data={"model": {"draft": "stub"}}, registry=reg)
    with pytest.raises(ValueError, match=r"model.aux_layers is unset and the default of draft 'stub' for this "
                                         r"8-layer target is invalid .*set model.aux_layers explicitly"):
        with_aux_layers(cfg, reg, num_layers=8)
    assert with_aux_layers(load_config(data={"model": {"draft": "stub", "aux_layers": [2, 5]}}, registry=reg),
                           reg, num_layers=8).model.aux_layers == [2, 5]
