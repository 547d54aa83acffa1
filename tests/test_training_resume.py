"""Checkpoints and exact resume through the real local pipeline (hf backend, local store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_core.config import load_config
from specforge_core.pipeline.local import run_local
from specforge_core.training.checkpoint import COMPLETE, latest_checkpoint

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


@pytest.fixture(scope="module")
def target_dir(tiny_chat_target):
    return tiny_chat_target


def config(tmp_path, target, out, *overrides):
    data = {
        "run": {"name": "resume", "output_dir": str(out), "seed": 3},
        "model": {"target": str(target), "draft_vocab_size": 256, "llama-eagle3": {"ttt_length": 2}},
        "dataset": {"path": [str(ASSETS / "data" / "sample_chat.jsonl")], "max_samples": 6,
                    "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 4, "micro_batch_size": 2, "gradient_accumulation": 1,
                     "lr": 3e-3, "save_every": 2, "keep_checkpoints": 1, "scheduler": "cosine",
                     "warmup_ratio": 0.25},
        "logging": {"progress": False},
    }
    return load_config(data=data, overrides=list(overrides))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, target_dir):
    # 4 steps over 6 samples at 2 per step: the run crosses an epoch boundary (seeded reshuffle)
    full = run_local(config(tmp_path, target_dir, tmp_path / "full"))
    assert full.steps == 4 and full.checkpoint.name == "step-000004"
    # keep_checkpoints = 1: the step-2 checkpoint was pruned
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-000004"]

    first = run_local(config(tmp_path, target_dir, tmp_path / "split"), stop_after_steps=2)
    assert first.steps == 2 and first.export_dir is None
    assert latest_checkpoint(tmp_path / "split").name == "step-000002"
    # a half-written newer checkpoint (no COMPLETE marker) must be ignored
    (tmp_path / "split" / "checkpoints" / "step-000003").mkdir()
    second = run_local(config(tmp_path, target_dir, tmp_path / "split", "training.resume=true"))
    assert second.steps == 4 and len(second.history) == 2
    assert (second.checkpoint / COMPLETE).exists()

    a, b = weights(full.checkpoint), weights(second.checkpoint)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed steps saw the same data, learning rates and losses as the uninterrupted ones
    for x, y in zip(full.history[2:], second.history, strict=True):
        assert x["lr"] == y["lr"] and x["tokens"] == y["tokens"] and x["loss"] == y["loss"]
    # the resumed run reused the saved vocab mapping and exported at the end
    assert (second.export_dir / "model.safetensors").exists()
    assert load_file(str(second.export_dir / "model.safetensors"))["d2t"].numel() == 256


def test_resume_without_checkpoint_starts_fresh(tmp_path, target_dir, capsys):
    r = run_local(config(tmp_path, target_dir, tmp_path / "fresh", "training.resume=true",
                         "training.max_steps=1", "training.save_every=0"))
    assert r.steps == 1 and latest_checkpoint(tmp_path / "fresh").name == "step-000001"
    out = capsys.readouterr().out
    assert "no complete checkpoint" in out
    assert "samples: 400 in = 2 trained + skipped" in out
