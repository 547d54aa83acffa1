"""``--engine vllm --speedup --concurrency``: vLLM's measured speed-up per concurrency level.

The runner times both engines (with the export as draft, and plain) generating the prompts c at a
time and counts engine steps. The step counts are checked against what the per-request results
imply, computed another way: a plain request takes one step per output token (the first comes
from its prefill step), a speculative one a prefill step plus one step per verification cycle,
and a wave of c requests lasts as long as its longest request.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_env import train_quickstart, vllm_python_or_skip

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "configs" / "assets" / "tiny-target"
PROMPTS = [str(ROOT / "configs" / "assets" / "data" / "eval_prompts.jsonl")]

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PYTHON = vllm_python_or_skip()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return train_quickstart(tmp_path_factory.mktemp("vllm-speedup"))


def _waves(lengths: list[int], c: int) -> int:
    return sum(max(lengths[i:i + c]) for i in range(0, len(lengths), c))


def test_measured_levels_count_the_steps_the_requests_imply(export):
    from specforge_core.evaluation import evaluate

    report = evaluate(export, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, steps=3,
                      max_new_tokens=16, max_prompts=5, speedup=True, concurrency=[1, 2, 5])
    assert report.ok, report.errors
    levels = {r["concurrency"]: r for r in report.extra["engine_speedup"]}
    assert sorted(levels) == [1, 2, 5]
    out_lens = [p.generated for p in report.prompts]
    spec_steps = [1 + p.raw.cycles for p in report.prompts]
    for c, r in levels.items():
        assert r["plain_steps"] == _waves(out_lens, c), (c, r, out_lens)
        assert r["spec_steps"] == _waves(spec_steps, c), (c, r, spec_steps)
        assert r["speedup"] == pytest.approx(r["spec_tok_s"] / r["plain_tok_s"])
        assert r["plain_step_ms"] > 0 and r["spec_step_ms"] > 0
