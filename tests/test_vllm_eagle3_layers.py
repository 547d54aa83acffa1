"""A 2-layer EAGLE-3 draft (``model.llama-eagle3.num_layers = 2``) served by the real vLLM (CPU
build, its own venv) as exported: vLLM loads every export tensor as written (no unused or
mismatched weight), speculative greedy equals vLLM's plain greedy, and its per-prompt acceptance
equals ``specforge eval``'s (hf engine, our proposer running both layers). The same export with
layer 1's up_proj (a tensor vLLM fuses, so the weight check cannot compare it) negated changes
vLLM's counts and still matches ours: vLLM reads layer 1.

Skipped when no vLLM environment is found (``nox -s vllm`` builds one and runs these tests).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from vllm_env import assert_same_per_prompt, train_quickstart, vllm_python_or_skip

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "configs" / "assets" / "tiny-target"
DATA = ROOT / "configs" / "assets" / "data"

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PYTHON = vllm_python_or_skip()
EVAL = dict(steps=3, max_new_tokens=32, max_prompts=12)
PROMPTS = [str(DATA / "eval_prompts.jsonl")]


def test_two_layer_export_in_vllm_equals_specforge_eval(tmp_path):
    from safetensors.torch import load_file, save_file

    from specforge_core.evaluation import evaluate

    export = train_quickstart(tmp_path / "run", "model.llama-eagle3.num_layers=2")
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    tensors = load_file(str(export / "model.safetensors"))
    assert {k.split(".")[1] for k in tensors if k.startswith("layers.")} == {"0", "1"}
    assert not any(k.startswith("midlayer.") for k in tensors)

    hf = evaluate(export, str(TARGET), PROMPTS, **EVAL)
    vllm = evaluate(export, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, **EVAL)
    assert hf.ok, hf.errors
    assert vllm.ok, vllm.errors  # spec == vLLM greedy, counters consistent, draft weights as exported
    w = vllm.extra["draft_weights"]
    assert w["checked"] and not w["unused"] and not w["mismatched"], w
    assert w["tensors"] == len(tensors)
    assert_same_per_prompt(hf, vllm)
    assert vllm.tau > 1.3, vllm.tau  # a trained draft, not a degenerate comparison

    # layer 1 matters to vLLM: change one of its fused tensors, both engines change alike
    changed = tmp_path / "layer1-changed"
    shutil.copytree(export, changed)
    tensors["layers.1.mlp.up_proj.weight"] = -tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(changed / "model.safetensors"))
    hf_c = evaluate(changed, str(TARGET), PROMPTS, **EVAL)
    vllm_c = evaluate(changed, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, **EVAL)
    assert hf_c.ok and vllm_c.ok, (hf_c.errors, vllm_c.errors)
    assert_same_per_prompt(hf_c, vllm_c)
    assert [p.raw for p in vllm_c.prompts] != [p.raw for p in vllm.prompts]
