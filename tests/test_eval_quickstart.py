"""`specforge eval` on the shipped tiny assets: a draft trained with the local pipeline for a few
dozen steps beats a freshly initialised one, and the CLI prints/writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "configs" / "assets" / "tiny-target"
DATA = ROOT / "configs" / "assets" / "data"

pytestmark = pytest.mark.skipif(
    not (TARGET / "model.safetensors").is_file(),
    reason="configs/assets/tiny-target has no weights (python tools/make_tiny_target.py makes them)",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from specforge_core.config import load_config
    from specforge_core.pipeline.local import run_local

    out = tmp_path_factory.mktemp("qs")
    cfg = load_config(data={
        "run": {"name": "qs", "output_dir": str(out / "run"), "seed": 0},
        "model": {"target": str(TARGET), "draft_vocab_size": 2048, "llama-eagle3": {"ttt_length": 3}},
        "dataset": {"path": [str(DATA / "sample_chat.jsonl")], "max_samples": 96, "cache_dir": str(out / "cache")},
        "training": {"max_steps": 36, "micro_batch_size": 4, "gradient_accumulation": 1,
                     "lr": 3e-3, "warmup_ratio": 0.05},
        "inference": {"batch_size": 8},
        "eval": {"data": [str(DATA / "eval_prompts.jsonl")], "steps": 3, "max_new_tokens": 24, "max_prompts": 6},
        "logging": {"progress": False},
    })
    result = run_local(cfg)
    return cfg, result


def untrained_export(cfg, out: Path) -> Path:
    """The same draft, freshly initialised (the trainer's seeded init), exported with the run's vocab."""
    from specforge_core.export import export_draft
    from specforge_core.run.vocab import vocab_mapping_path
    from specforge_core.target import target_info, with_aux_layers
    from specforge_core.training.trainer import Trainer
    from specforge_core.vocab import VocabMapping

    vocab = VocabMapping.load(str(vocab_mapping_path(cfg)))
    trainer = Trainer(cfg, target_info(cfg.model.target, with_aux_layers(cfg).model.aux_layers), vocab, total_steps=1)
    return export_draft(trainer.draft, vocab, out)


def test_trained_draft_beats_untrained(run, tmp_path):
    from specforge_core.evaluation import evaluate

    cfg, result = run
    kw = dict(steps=3, max_new_tokens=24, max_prompts=6, fast=True)
    prompts = [str(DATA / "eval_prompts.jsonl")]
    trained = evaluate(result.export_dir, str(TARGET), prompts, **kw)
    untrained = evaluate(untrained_export(cfg, tmp_path / "untrained"), str(TARGET), prompts, **kw)
    assert trained.overall.cycles > 0 and untrained.overall.cycles > 0
    assert untrained.tau < trained.tau, (untrained.tau, trained.tau)
    assert trained.categories  # the eval prompts carry categories


def test_cli_from_config(run, tmp_path, capsys):
    from specforge_core.cli import main

    cfg, result = run
    toml = Path(cfg.output_dir) / "config.toml"
    out_json, out_png = tmp_path / "r.json", tmp_path / "acc.png"
    rc = main(["eval", str(toml), "eval.max_prompts=2", "eval.max_new_tokens=12",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tau =" in text
    rep = json.loads(out_json.read_text())
    assert rep["mode"] == "exact" and rep["errors"] == [] and len(rep["prompts"]) == 2
    assert rep["draft"] == str(result.export_dir)
    assert len(rep["overall"]["accept_rates"]) == 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_draft_dir(tmp_path, capsys):
    from specforge_core.cli import main

    rc = main(["eval", "--draft", str(tmp_path / "nope"), "--target", str(TARGET),
               "--data", str(DATA / "eval_prompts.jsonl")])
    assert rc == 2
    assert "no config.json" in capsys.readouterr().err
