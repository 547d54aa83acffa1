"""`specforge export` from a sharded fsdp2 (DCP) checkpoint, in one process with no process group,
and a fresh run never pairs its weights with an older run's vocab mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_core import distributed
from specforge_core.config import load_config
from specforge_core.export import export_from_checkpoint
from specforge_core.registry import get_registry
from specforge_core.run.vocab import vocab_mapping_path
from specforge_core.target import target_info, with_aux_layers
from specforge_core.testing import make_tiny_model
from specforge_core.training import checkpoint as ckpt
from specforge_core.training.trainer import Trainer
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping, build_vocab_mapping

ROOT = Path(__file__).resolve().parents[1]


def _samples(n: int, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (24,), generator=g)
        mask = torch.zeros(24, dtype=torch.uint8)
        mask[8:] = 1
        out.append(Sample(f"s{i}", ids, mask))
    return out


@pytest.mark.slow
def test_export_reads_fsdp2_checkpoint_without_process_group(tmp_path):
    target = tmp_path / "target"
    make_tiny_model(target, vocab_size=256)
    cfg = load_config(data={
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"target": str(target), "draft_vocab_size": 64, "llama-eagle3": {"ttt_length": 2}},
        "training": {"strategy": "fsdp2", "lr": 1e-2},
    })
    samples = _samples(4, 256)
    vocab = build_vocab_mapping(samples, 256, 64)
    vocab.save(str(vocab_mapping_path(cfg)))
    backend = get_registry().create_for(cfg, "target_backend", cfg, "cpu")
    feats = backend.generate(samples)
    backend.close()

    distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        trainer = Trainer(cfg, target_info(str(target), with_aux_layers(cfg).model.aux_layers), vocab, total_steps=2)
        trainer.train_step([feats[:2], feats[2:]])
        path = ckpt.save(trainer, cfg.output_dir, data_position={"epoch": 0, "index": 4},
                         config_toml="", vocab_path=str(vocab_mapping_path(cfg)), keep=2)
        full = trainer.strategy.full_state_dict(trainer.model)
    finally:
        distributed.destroy()
    assert (path / ".metadata").exists()  # a real DCP checkpoint

    out = export_from_checkpoint(cfg, out_dir=tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    trained = {k.removeprefix("draft."): v for k, v in full.items()}
    for key in ("fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight", "norm.weight"):
        assert torch.equal(exported[key], trained[key].to(torch.bfloat16)), key
    assert torch.equal(exported["d2t"], vocab.d2t)


@pytest.mark.slow
def test_fresh_run_replaces_an_older_vocab_mapping(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = [f"run.output_dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                 "training.max_steps=1", "dataset.max_samples=8", "logging.progress=false"]
    cfg = load_config([ROOT / "configs" / "quickstart.toml"], overrides=overrides)
    stale = VocabMapping.from_target_ids(torch.arange(512), 1856)  # ids 0..511: not this data's
    path = vocab_mapping_path(cfg)
    path.parent.mkdir(parents=True)
    stale.save(str(path))
    from specforge_core.pipeline import run_pipeline

    result = run_pipeline(cfg)
    saved = VocabMapping.load(str(path))
    assert not torch.equal(saved.d2t, stale.d2t)
    exported = load_file(str(result.export_dir / "model.safetensors"))
    assert torch.equal(exported["d2t"], saved.d2t)
