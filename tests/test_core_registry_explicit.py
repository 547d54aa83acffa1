"""The registry is passed explicitly: a loss registered in-process on a Pipeline's registry is the
one ``Pipeline.run`` trains with (not the process-wide registry's)."""

from __future__ import annotations

import types
from pathlib import Path

from specforge_defaults.loss import ForwardKLLoss

from specforge_core import hookimpl
from specforge_core.api import Pipeline
from specforge_core.registry import get_registry, registry_from

ROOT = Path(__file__).resolve().parents[1]


def test_in_process_loss_is_used_by_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    calls = []

    class CountingKL(ForwardKLLoss):
        """Counts its per-group work on both paths of the loss contract."""

        def __call__(self, *args, **kwargs):
            calls.append("call")
            return super().__call__(*args, **kwargs)

        def weighted_groups(self, *args, **kwargs):
            groups = super().weighted_groups(*args, **kwargs)
            add = groups.add

            def counted_add(*a, **k):
                calls.append("group")
                return add(*a, **k)

            groups.add = counted_add
            return groups

    plugin = types.SimpleNamespace()

    @hookimpl
    def register_losses(register):
        register("counting-kl", lambda options: CountingKL(), description="forward-kl that counts its calls")

    plugin.register_losses = register_losses
    registry = registry_from([("counting", plugin)])
    assert "counting-kl" not in get_registry().names("loss")  # only this registry knows it

    pipe = Pipeline.from_dict({
        "run": {"name": "reg", "output_dir": str(tmp_path / "run")},
        "model": {"target": "configs/assets/tiny-target", "draft_vocab_size": 256, "llama-eagle3": {"ttt_length": 2}},
        "dataset": {"path": ["configs/assets/data/sample_chat.jsonl"], "max_samples": 2,
                    "cache_dir": str(tmp_path / "cache")},
        "training": {"loss": "counting-kl", "max_steps": 1},
        "logging": {"progress": False},
    }, registry=registry)
    result = pipe.run()
    assert result.steps == 1
    # one group per TTT step of the one micro-batch, through the contract's fast path (EAGLE-3
    # knows every step's rows and weight before the forward)
    assert calls == ["group", "group"]
