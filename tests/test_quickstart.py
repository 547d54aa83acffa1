"""Smoke test of configs/quickstart.toml: a few steps end to end on the bundled tiny assets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_core.config import load_config
from specforge_core.export import export_from_checkpoint
from specforge_core.pipeline import run_pipeline
from specforge_core.training.checkpoint import COMPLETE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_few_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the config's asset paths are relative to the repo root
    cfg = load_config(
        [ROOT / "configs" / "quickstart.toml"],
        overrides=[
            "training.max_steps=6", "training.log_every=1", f"run.output_dir={tmp_path / 'run'}",
            f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.max_samples=48", "logging.progress=false",
            # trace optimizer step 3 with the PyTorch profiler (the [profiler] section)
            "profiler.enabled=true", "profiler.start_step=3", "profiler.num_steps=1",
            f"profiler.output_dir={tmp_path / 'traces'}",
        ],
    )
    result = run_pipeline(cfg)
    assert result.steps == 6
    assert result.checkpoint.name == "step-000006" and (result.checkpoint / COMPLETE).exists()
    exported = load_file(str(result.export_dir / "model.safetensors"))
    assert {"fc.weight", "lm_head.weight", "d2t", "t2d"} <= set(exported)
    assert (result.export_dir / "config.json").exists()

    traces = list((tmp_path / "traces").glob("trace_rank0_step*.json"))
    assert len(traces) == 1 and '"traceEvents"' in traces[0].read_text()[:100_000]

    losses = [m["loss"] for m in result.history]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    out = capsys.readouterr().out
    assert "step 6/6 | loss" in out and "samples: 400 in = 48 trained + skipped" in out

    # `specforge export` from the final checkpoint reproduces the pipeline's export exactly
    again = export_from_checkpoint(cfg, out_dir=tmp_path / "again")
    for k, t in load_file(str(again / "model.safetensors")).items():
        assert torch.equal(t, exported[k]), k
