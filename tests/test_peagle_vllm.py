"""A P-EAGLE export served by the real vLLM (CPU build, its own venv) as ``eagle3`` with
``parallel_drafting``: it loads with every exported tensor used (``mask_hidden`` included), and its
per-step acceptance equals the slow speculation loop's and ``specforge eval``'s, prompt by prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_env import vllm_python_or_skip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "assets" / "tiny-target"


pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PYTHON = vllm_python_or_skip()

RUNNER = r'''
import json, sys
def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    req = json.load(open(sys.argv[1]))
    llm = LLM(model=req["target"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              disable_log_stats=False, speculative_config={"method": "eagle3", "model": req["draft"],
                                                           "num_speculative_tokens": req["k"],
                                                           "parallel_drafting": True},
              per_request_spec_decode_metrics="detailed")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]],
                        SamplingParams(temperature=0.0, max_tokens=req["max_new"], ignore_eos=True,
                                       detokenize=False), use_tqdm=False)
    res = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "per_step_accepted": []}
    for o in outs:
        m = getattr(o.outputs[0], "spec_decode_metrics", None) or getattr(o, "spec_decode_metrics", None)
        d = m.to_dict() if hasattr(m, "to_dict") else {}
        res["per_step_accepted"].append(list(d.get("per_step_accepted", getattr(m, "per_step_accepted", []) or [])))
    def grab(worker):
        model = worker.model_runner.drafter.model
        return {"mask_hidden": model.mask_hidden.detach().float().flatten().tolist(),
                "layers": len(model.model.layers), "parallel": bool(worker.model_runner.drafter.parallel_drafting)}
    res["drafter"] = llm.collective_rpc(grab)[0]
    json.dump(res, open(sys.argv[2], "w"))
if __name__ == "__main__":
    main()
'''


def _serve(tmp_path: Path, **req) -> dict:
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "req.json").write_text(json.dumps({"target": str(TINY), **req}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([PYTHON, str(tmp_path / "runner.py"), str(tmp_path / "req.json"), str(tmp_path / "res.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "res.json").read_text())


def test_peagle_acceptance_in_vllm_equals_specforge_eval(tmp_path):
    from safetensors.torch import load_file
    from specforge_peagle.export import load_export
    from specforge_peagle.plugin import PEagleOptions, make_peagle
    from test_peagle import PROMPTS, greedy_sequences, overfit_draft, slow_speculation
    from transformers import AutoModelForCausalLM

    from specforge_core.evaluation.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    K, M = 3, 24
    seqs = greedy_sequences(model, PROMPTS, M + K)
    greedy = [s[len(p): len(p) + M] for s, p in zip(seqs, PROMPTS, strict=True)]
    alg = make_peagle(PEagleOptions(num_depths=4, num_layers=2, down_sample_ratio=0.9, down_sample_ratio_min=0.5))
    export = overfit_draft(model, seqs, alg, tmp_path, steps=25)
    draft, d2t = load_export(export)
    ours = [slow_speculation(model, draft, d2t, p, K, M)[0] for p in PROMPTS]

    served = _serve(tmp_path, draft=str(export), k=K, prompts=PROMPTS, max_new=M)
    assert served["drafter"]["parallel"] and served["drafter"]["layers"] == 2
    torch.testing.assert_close(torch.tensor(served["drafter"]["mask_hidden"]),
                               load_file(str(export / "model.safetensors"))["mask_hidden"].float().flatten())
    assert served["outputs"] == greedy
    assert served["per_step_accepted"] == ours  # prompt by prompt, cycle by cycle
    assert sum(a >= 2 for v in ours for a in v) > 0 and sum(a < K for v in ours for a in v) > 0

    # `specforge eval --engine vllm` serves the export with parallel drafting (its config says so),
    # every exported tensor used, and its per-prompt counts equal the in-process engine's
    kw = dict(steps=K, max_new_tokens=M, eos_ids=(), dtype="fp32")
    hf = evaluate(str(export), str(TINY), PROMPTS, device="cpu", **kw)
    vl = evaluate(str(export), str(TINY), PROMPTS, engine="vllm", engine_python=PYTHON, **kw)
    assert hf.ok, hf.errors
    assert vl.ok, vl.errors
    assert [p.raw for p in vl.prompts] == [p.raw for p in hf.prompts]
    assert [p.stats for p in vl.prompts] == [p.stats for p in hf.prompts]
