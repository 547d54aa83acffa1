"""The Ray pipeline uses the draft algorithm's own default aux layers when ``model.aux_layers`` is
unset: DFlash (z-lab's spread, [2, 6] on the 8-layer tiny target, not EAGLE-3's [2, 4, 5]) trains
through real Ray actors on loopback, the engines capture those layers (a different count would not
fit the draft's fc), and the export names them; the run dir's config keeps the field unset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "configs" / "assets" / "tiny-target"
DATA = ROOT / "configs" / "assets" / "data" / "sample_chat.jsonl"

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (TARGET / "model.safetensors").is_file(), reason="tiny target has no weights")]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, object_store_memory=150_000_000, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_pipeline_trains_dflash_on_its_default_aux_layers(tmp_path):
    from safetensors.torch import load_file
    from specforge_dflash.plugin import DFlashAlgorithm, DFlashOptions

    from specforge_core.config import load_config
    from specforge_core.pipeline import run_pipeline

    hf = json.loads((TARGET / "config.json").read_text())
    L, H = hf["num_hidden_layers"], hf["hidden_size"]
    expected = DFlashAlgorithm(DFlashOptions(num_layers=2)).default_aux_layers(L)
    assert expected != [2, L // 2, L - 3]
    cfg = load_config(data={
        "run": {"name": "rayaux", "output_dir": str(tmp_path / "run"), "seed": 0, "pipeline": "ray"},
        "model": {"target": str(TARGET), "draft": "dflash", "draft_vocab_size": 128},
        "dataset": {"path": [str(DATA)], "max_samples": 8, "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 2, "micro_batch_size": 2, "scheduler": "constant", "warmup_ratio": 0.0,
                     "num_gpus": 1},
        "transfer": {"store": "shm"},
        "logging": {"progress": False},
    })
    assert cfg.model.aux_layers == []
    res = run_pipeline(cfg)
    assert res.steps == 2
    exported = json.loads((res.export_dir / "config.json").read_text())
    assert [i + 1 for i in exported["dflash_config"]["target_layer_ids"]] == expected
    assert load_file(str(res.export_dir / "model.safetensors"))["fc.weight"].shape == (H, len(expected) * H)
    assert "aux_layers = []" in (tmp_path / "run" / "config.toml").read_text()
