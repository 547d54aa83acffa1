"""An EAGLE-3.1 draft (``fc_norm`` + ``norm_output``) served by the real vLLM (CPU build, its own
venv): vLLM loads every export tensor as written and its per-prompt acceptance equals
``specforge eval``'s; the same export with ``norm_output`` switched off in config.json changes
vLLM's counts, so vLLM reads the key (it is not ignored).

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


def test_eagle31_export_in_vllm_equals_specforge_eval(tmp_path):
    from specforge_core.evaluation import evaluate

    export = train_quickstart(tmp_path / "run", "model.llama-eagle3.fc_norm=true", "model.llama-eagle3.norm_output=true")
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["fc_norm"] is True and cfg["norm_output"] is True
    hf = evaluate(export, str(TARGET), PROMPTS, **EVAL)
    vllm = evaluate(export, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, **EVAL)
    assert hf.ok, hf.errors
    assert vllm.ok, vllm.errors  # spec == vLLM greedy, counters consistent, draft weights as exported
    w = vllm.extra["draft_weights"]
    assert w["checked"] and not w["unused"] and not w["mismatched"]  # fc_norm.{i} included
    assert_same_per_prompt(hf, vllm)
    assert vllm.tau > 1.5  # a trained draft, not a degenerate comparison

    # the key matters to vLLM: without it, vLLM chains the un-normed output and its counts change
    off = tmp_path / "norm-output-off"
    shutil.copytree(export, off)
    (off / "config.json").write_text(json.dumps({**cfg, "norm_output": False}))
    vllm_off = evaluate(off, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, **EVAL)
    hf_off = evaluate(off, str(TARGET), PROMPTS, **EVAL)
    assert vllm_off.ok and hf_off.ok, (vllm_off.errors, hf_off.errors)
    assert [p.raw for p in vllm_off.prompts] == [p.raw for p in hf_off.prompts]
    assert [p.raw for p in vllm_off.prompts] != [p.raw for p in vllm.prompts]
