"""``specforge eval --engine vllm`` against the real vLLM (CPU build, its own venv).

A quickstart-style draft is trained twice on the tiny target: with the default aux layers and
with model.aux_layers = [1, 3, 5]. vLLM serves each export as the EAGLE-3 draft; its output must
equal its own plain greedy output, it must load every export tensor as written, and its per-step
acceptance (EOS-truncated by the project's rule, and raw) must equal the in-process hf engine's on
every prompt. A copy of the non-default export with the old key layout (ids only under
``eagle_config``) must *not* match: that is the defect the top-level key fixes.

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


def _train(out: Path, aux_layers: list[int]) -> Path:
    return train_quickstart(out, f"model.aux_layers={json.dumps(aux_layers)}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-eval")
    return {"default": _train(root / "default", []), "aux135": _train(root / "aux135", [1, 3, 5])}


def _both(export: Path):
    from specforge_core.evaluation import evaluate

    hf = evaluate(export, str(TARGET), PROMPTS, **EVAL)
    vllm = evaluate(export, str(TARGET), PROMPTS, engine="vllm", engine_python=PYTHON, **EVAL)
    return hf, vllm


@pytest.mark.parametrize("which", ["default", "aux135"])
def test_vllm_acceptance_equals_specforge_eval_per_step(exports, which):
    export = exports[which]
    cfg = json.loads((export / "config.json").read_text())
    if which == "aux135":
        assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    else:
        assert "eagle_aux_hidden_state_layer_ids" not in cfg and "target_hidden_size" not in cfg
    hf, vllm = _both(export)
    assert hf.ok, hf.errors
    assert vllm.ok, vllm.errors  # spec == vLLM greedy, counters consistent, draft weights as exported
    assert vllm.extra["draft_weights"]["checked"] and not vllm.extra["draft_weights"]["unused"]
    assert_same_per_prompt(hf, vllm)
    assert vllm.extra["engine_raw_tau"] == pytest.approx(vllm.raw.tau)
    assert vllm.tau > 1.5  # a trained draft, not a degenerate comparison


def test_old_layout_makes_vllm_capture_the_wrong_layers(exports, tmp_path):
    """Ids only under eagle_config (the layout before the fix): vLLM no longer captures the layers
    the draft was trained on (its V1 runner reads eagle_config's SGLang-numbered ids as its own, one
    layer off), so its per-step acceptance departs from the hf engine's, which reads them right."""
    old = tmp_path / "old-layout"
    shutil.copytree(exports["aux135"], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["eagle_aux_hidden_state_layer_ids"]
    (old / "config.json").write_text(json.dumps(cfg))
    hf, vllm = _both(old)
    assert vllm.ok, vllm.errors  # still exact: a wrong draft only costs acceptance
    print(f"old layout: hf tau {hf.tau:.3f}, vLLM tau {vllm.tau:.3f}")
    assert [p.stats for p in vllm.prompts] != [p.stats for p in hf.prompts]
