"""The real reference target served by the real vLLM: a SmolLM2-135M-Instruct draft trained by the
CPU recipe on real ShareGPT loads in vLLM as its EAGLE-3 draft (every exported tensor used, none
random) and vLLM's per-prompt acceptance on MT-bench first turns equals ``specforge eval``'s.

Needs the reference assets (`specforge reference fetch`, default ./reference or
$SPECFORGE_REFERENCE_DIR) and a vLLM environment (`nox -s vllm` builds one); skipped, saying which,
when either is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_env import vllm_python_or_skip

from specforge_core.reference import Paths, default_dir

ROOT = Path(__file__).resolve().parent.parent
REF = Paths(default_dir())

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    if not (REF.model / "config.json").is_file() or not REF.sharegpt_small.is_file():
        pytest.skip(f"no reference assets in {REF.root} (`specforge reference fetch`)")
    from specforge_core.config import load_config
    from specforge_core.pipeline.local import run_local

    out = tmp_path_factory.mktemp("ref-vllm")
    cfg = load_config([ROOT / "configs" / "smollm2-sharegpt-cpu.toml"], overrides=[
        f"model.target={REF.model}", f'dataset.path=["{REF.sharegpt_small}"]', f"run.output_dir={out / 'run'}",
        f"dataset.cache_dir={out / 'cache'}", "dataset.max_samples=16", "dataset.max_seq_length=192",
        "logging.progress=false"])
    return Path(run_local(cfg).export_dir)


def test_vllm_serves_the_real_target_draft_with_equal_per_prompt_acceptance(export):
    from specforge_core.evaluation import evaluate

    python = vllm_python_or_skip()
    prompts = [str(REF.mtbench)]
    kw = dict(steps=3, max_new_tokens=24, max_prompts=6)
    hf = evaluate(export, str(REF.model), prompts, **kw)
    vllm = evaluate(export, str(REF.model), prompts, engine="vllm", engine_python=python, **kw)
    assert hf.ok, hf.errors
    assert vllm.ok, vllm.errors  # spec == vLLM's own greedy output; counters consistent
    weights = vllm.extra["draft_weights"]
    assert weights["checked"] and not weights["unused"], weights  # every exported tensor loaded as written
    assert len(hf.prompts) == len(vllm.prompts) == 6
    for a, b in zip(hf.prompts, vllm.prompts, strict=True):
        assert a.sample_id == b.sample_id
        assert a.generated == b.generated, a.sample_id  # as many tokens from both engines
        assert a.stats == b.stats, a.sample_id  # per-step acceptance, EOS-truncated
        assert a.raw == b.raw, a.sample_id  # vLLM's own counters
    # a real MT-bench comparison: categories carried through both engines
    assert {p.category for p in hf.prompts} == {p.category for p in vllm.prompts}
