"""Temperature > 0: the in-process evaluator's acceptance against the real vLLM's (CPU build).

Both verify K = 3 greedy-drafted chains by speculative sampling (vLLM's default
``draft_sample_method = "greedy"``: accept the draft with probability p(draft), else sample the
residual). They draw different random numbers, so the check is statistical: the accepted drafts
per cycle, hf's exact expectation against vLLM's sampled mean, must agree within 3 standard
errors of the difference (cluster-robust over prompts: cycles of one prompt are correlated).

Measured (December 2026, vLLM 0.32 CPU): vLLM's sampling path accepts almost no drafts even at
T = 0.001, where it must equal its own greedy path (which agrees with ours exactly, per cycle): 0.07
accepted per cycle against our 1.48 on 16 quickstart prompts, our T = 0.001 number equal to our
greedy one. The tests are strict xfails that document this; they start failing (XPASS) when vLLM's
CPU sampling path is fixed, and then the marker goes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from vllm_env import vllm_python_or_skip

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "configs" / "assets" / "tiny-target"
PROMPTS = [str(ROOT / "configs" / "assets" / "data" / "eval_prompts.jsonl")]


pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PYTHON = vllm_python_or_skip()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from specforge_core.config import load_config
    from specforge_core.pipeline.local import run_local

    out = tmp_path_factory.mktemp("vllm-sampling")
    cfg = load_config([ROOT / "configs" / "quickstart.toml"], overrides=[
        f"run.output_dir={out}", "training.max_steps=40", "logging.progress=false", f"dataset.cache_dir={out / 'cache'}"])
    return Path(run_local(cfg).export_dir)


def accepted_per_cycle(report) -> tuple[float, float]:
    """(accepted drafts / cycles, its cluster-robust standard error over prompts)."""
    acc = [p.raw.tokens - p.raw.cycles for p in report.prompts]
    cyc = [p.raw.cycles for p in report.prompts]
    r, n = sum(acc) / sum(cyc), len(acc)
    se = math.sqrt(n / (n - 1) * sum((a - r * c) ** 2 for a, c in zip(acc, cyc, strict=True)) / sum(cyc) ** 2)
    return r, se


@pytest.mark.xfail(strict=True, reason="vLLM CPU's speculative sampling path accepts ~no drafts (see module doc)")
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_acceptance_within_the_interval_of_vllm(export, temperature):
    from specforge_core.evaluation import evaluate

    kw = dict(steps=3, max_new_tokens=48, max_prompts=24, temperature=temperature, seed=1)
    hf = evaluate(export, str(TARGET), PROMPTS, **kw)
    vllm = evaluate(export, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, **kw)
    assert vllm.ok, vllm.errors
    r_hf, se_hf = accepted_per_cycle(hf)
    r_v, se_v = accepted_per_cycle(vllm)
    expected = hf.extra["expected_tau"] - 1
    assert abs(r_hf - expected) <= 3 * se_hf  # our own sampled run agrees with our exact expectation
    bound = 3 * math.sqrt(se_hf ** 2 + se_v ** 2)
    assert abs(expected - r_v) <= bound, json.dumps({"hf_expected": expected, "hf": r_hf, "vllm": r_v, "bound": bound})
