"""Composition from Python without TOML: sections as dicts, components by name and by instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from specforge_core.api import Pipeline
from specforge_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _data(tmp_path):
    return {
        "run": {"name": "api", "output_dir": str(tmp_path / "run")},
        "model": {"target": "configs/assets/tiny-target", "draft": "llama-eagle3", "draft_vocab_size": 256, "llama-eagle3": {"ttt_length": 2}},
        "dataset": {"path": ["configs/assets/data/sample_chat.jsonl"], "max_samples": 8,
                    "cache_dir": str(tmp_path / "cache")},
        "training": {"loss": "forward-kl", "scheduler": "linear", "max_steps": 2,
                     "micro_batch_size": 2, "gradient_accumulation": 2},
        "logging": {"progress": False},
    }


@pytest.mark.slow
def test_pipeline_from_dict_with_a_ready_made_backend(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    pipe = Pipeline.from_dict(_data(tmp_path))
    assert pipe.config.training.scheduler == "linear"
    assert pipe.build("lr_scheduler", 10, 0)(5) == pytest.approx(0.5)  # a component by name

    backend = pipe.build("target_backend", pipe.config, "cpu")  # an instance we own and hand in
    calls = []
    original = backend.generate
    backend.generate = lambda samples: calls.append(len(samples)) or original(samples)
    try:
        result = pipe.run(target_backend=backend)
    finally:
        backend.close()
    assert result.steps == 2 and sum(calls) == 8  # our instance produced every feature
    assert (result.export_dir / "model.safetensors").exists()


def test_from_dict_errors_name_python_as_source():
    with pytest.raises(ConfigError, match=r"python: training.lrr: unknown key; did you mean 'training.lr'"):
        Pipeline.from_dict({"training": {"lrr": 1.0}})
