"""Gemma 3 270M served by the real vLLM 0.32 with an EAGLE-3 draft trained by the CPU recipe.

vLLM's own ``Gemma3ForCausalLM`` has no EAGLE-3 interface (no aux hidden states: "Model does not
support EAGLE3 interface"); its Transformers backend (``model_impl="transformers"``) has, and the eval
runner picks it for such targets. There the draft shares HF's *scaled* embedding module, while
training read the raw table: EAGLE-3 RMS-normalises the embedding first, so per-prompt acceptance
still equals ``specforge eval``'s (the HF engine) -- this test is what says so.

Needs ``reference/gemma3-270m`` (`specforge reference fetch --gemma3`), ShareGPT/MT-bench and a vLLM
environment (`nox -s vllm`); skipped, saying which, when one is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_env import assert_same_per_prompt, train_gemma3_cpu, vllm_python_or_skip

from specforge_core.reference import Paths, default_dir

REF = Paths(default_dir())

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return train_gemma3_cpu(tmp_path_factory.mktemp("gemma-vllm"))


def test_vllm_serves_a_gemma3_eagle3_draft_with_equal_per_prompt_acceptance(export):
    from specforge_core.evaluation import evaluate

    python = vllm_python_or_skip()
    kw = dict(steps=3, max_new_tokens=24, max_prompts=4, chat_template="gemma")
    hf = evaluate(export, str(REF.gemma3), [str(REF.mtbench)], **kw)
    vllm = evaluate(export, str(REF.gemma3), [str(REF.mtbench)], engine="vllm", engine_python=python, **kw)
    assert hf.ok, hf.errors
    assert vllm.ok, vllm.errors  # spec == vLLM's own greedy output; counters consistent
    weights = vllm.extra["draft_weights"]
    assert weights["checked"] and not weights["unused"], weights
    assert len(hf.prompts) == len(vllm.prompts) == 4
    assert_same_per_prompt(hf, vllm)
