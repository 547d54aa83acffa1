"""Real-length training on a GPU (perf suite, benchmark-style; skipped without CUDA): the token
budget over ShareGPT's length distribution keeps one shape, compiles nothing after warm-up, keeps
peak memory flat and pads little, at the 8B-shaped draft of benchmarks/varlen_step.py. No timed
assertion: the speed figures live in docs/performance.md. On one H200: ~1 min."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_token_budget_on_real_lengths_has_one_shape_no_recompile_flat_memory(tmp_path):
    out = tmp_path / "varlen.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/varlen_step.py"), "--variants", "fixed", "budget",
                        "--steps", "6", "--warmup", "6", "--json", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {x["variant"]: x for x in json.loads(out.read_text())["runs"]}
    budget = runs["budget"]
    assert budget["status"] == "ok", budget
    assert budget["shapes"] == 1 and budget["recompiles_after_warmup"] == 0
    assert budget["flat"] > 0.95  # min/max of the per-step peaks (H200: 0.99)
    assert budget["pad_frac"] < 0.05  # rows of 8192 over ShareGPT lengths (H200 run: 2.6 %)
    assert budget["tokens_per_step"] >= runs["fixed"]["tokens_per_step"]  # the budget fills what fixed T holds
