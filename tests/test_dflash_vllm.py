"""DFlash and EAGLE-3.1 exports served by the real vLLM (CPU build, its own venv): DFlash's per-step
acceptance in vLLM equals ``specforge eval``'s (K = block_size - 1, and K < block_size - 1), and an EAGLE-3.1 (``fc_norm``) export loads with its
norm weights as written."""

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
              disable_log_stats=False, speculative_config={"method": req["method"], "model": req["draft"],
                                                           "num_speculative_tokens": req["k"]},
              per_request_spec_decode_metrics="detailed")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]],
                        SamplingParams(temperature=0.0, max_tokens=req["max_new"], ignore_eos=True,
                                       detokenize=False), use_tqdm=False)
    res = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "per_step_accepted": []}
    for o in outs:
        m = getattr(o.outputs[0], "spec_decode_metrics", None) or getattr(o, "spec_decode_metrics", None)
        d = m.to_dict() if hasattr(m, "to_dict") else {}
        res["per_step_accepted"].append(list(d.get("per_step_accepted", getattr(m, "per_step_accepted", []) or [])))
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            res[m.name.split(":")[1]] = getattr(m, "values", None) or getattr(m, "value", None)
    if req.get("fc_norm"):
        def grab(worker):
            model = worker.model_runner.drafter.model.model
            return [n.weight.detach().float().tolist() for n in model.fc_norm]
        res["fc_norm"] = llm.collective_rpc(grab)[0]
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


def _vllm_cpu_context_k_norm(draft):
    """A copy of ``draft`` whose context keys are normed with layer 0's k_norm in every layer: what
    vLLM 0.32's CPU build computes. ``precompute_and_store_context_kv`` norms all layers' context
    keys in one ``ops.rms_norm`` call with the stacked [L, head_dim] k_norm weights; the CPU kernel
    applies the first row to every layer (the GPU kernel picks the row per layer)."""
    import copy

    d = copy.deepcopy(draft)
    k_norm0 = d.layers[0].self_attn.k_norm
    for layer in d.layers:
        attn = layer.self_attn

        def kv_of(x, pos, _a=attn):
            if x.dim() != 3:  # the block's own keys: the layer's k_norm, as on the GPU
                return type(_a).kv_of(_a, x, pos)
            saved, _a.k_norm = _a.k_norm, k_norm0
            try:
                return type(_a).kv_of(_a, x, pos)
            finally:
                _a.k_norm = saved

        attn.kv_of = kv_of
    return d


def _per_step(model, draft, d2t, prompts, K, M):
    from specforge_dflash.proposer import DFlashProposer

    from specforge_core.evaluation.evaluate import evaluate

    rep = evaluate("-", str(TINY), prompts, steps=K, max_new_tokens=M, eos_ids=(), device="cpu", dtype="fp32",
                   proposer=lambda _d, _t, dev: DFlashProposer(draft, d2t, dev))
    assert rep.ok
    return rep


def test_dflash_acceptance_in_vllm_equals_specforge_eval(tmp_path):
    from specforge_dflash.export import load_export
    from specforge_dflash.plugin import DFlashOptions, make_dflash
    from test_dflash import _overfit_draft, _slow_speculation
    from transformers import AutoModelForCausalLM

    from specforge_core.export import write_export

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    prompts = [[1, 7, 300, 42, 9, 77], [1, 5, 600, 601, 33], [1, 12, 800, 14, 15, 16, 17]]
    K, M = 3, 24
    with torch.no_grad():
        seqs = [model.generate(torch.tensor([p]), max_new_tokens=M + K, do_sample=False, eos_token_id=None
                               )[0].tolist() for p in prompts]
    greedy = [s[len(p): len(p) + M] for s, p in zip(seqs, prompts, strict=True)]
    alg = make_dflash(DFlashOptions(block_size=4, num_layers=2, loss_decay=0.0, anchor_stride=1))
    export = _overfit_draft(model, seqs, alg, tmp_path)
    draft, d2t = load_export(export)
    ours = [_slow_speculation(model, draft, d2t, p, K, M)[0] for p in prompts]

    # 1. As trained (k_norm differs per layer): vLLM CPU == our draft with its context-key norm.
    served = _serve(tmp_path, draft=str(export), method="dflash", k=K, prompts=prompts, max_new=M)
    assert served["outputs"] == greedy
    emulated = _per_step(model, _vllm_cpu_context_k_norm(draft), d2t, prompts, K, M)
    steps = served["per_step_accepted"]
    assert served["spec_decode_num_drafts"] == emulated.raw.cycles == sum(map(len, steps))
    assert served["spec_decode_num_accepted_tokens_per_pos"] == emulated.raw.at_least
    assert steps != ours  # the deviation is visible on this draft (else this part proves nothing)

    # 2. Same k_norm in every layer (the CPU deviation cannot act): vLLM == our draft, per step.
    with torch.no_grad():
        for layer in draft.layers[1:]:
            layer.self_attn.k_norm.weight.copy_(draft.layers[0].self_attn.k_norm.weight)
    vocab = type("V", (), {"d2t": d2t - torch.arange(d2t.numel()), "t2d": torch.ones(d2t.numel(), dtype=torch.bool)})
    config, tensors = alg.export(draft, vocab)
    export2 = write_export(config, tensors, tmp_path / "export-shared-knorm")
    draft2, _ = load_export(export2)
    ours2 = [_slow_speculation(model, draft2, d2t, p, K, M)[0] for p in prompts]
    served2 = _serve(tmp_path, draft=str(export2), method="dflash", k=K, prompts=prompts, max_new=M)
    assert served2["outputs"] == greedy and served2["per_step_accepted"] == ours2
    assert sum(a >= 2 for v in ours2 for a in v) > 0  # drafts beyond the first are accepted

    # 3. `specforge eval --engine vllm` serves the export with the method its config names (dflash,
    # not eagle3) and its per-prompt counts equal the in-process engine's on the same export
    from specforge_vllm.eval_engine import speculative_method

    from specforge_core.evaluation.evaluate import evaluate

    assert speculative_method(export2) == "dflash"
    kw = dict(steps=K, max_new_tokens=M, eos_ids=(), dtype="fp32")
    hf = evaluate(str(export2), str(TINY), prompts, device="cpu", **kw)
    vl = evaluate(str(export2), str(TINY), prompts, engine="vllm", engine_python=PYTHON, **kw)
    assert hf.ok, hf.errors
    assert vl.ok, vl.errors  # spec output == vLLM's greedy; every draft tensor loaded as exported
    assert [p.raw for p in vl.prompts] == [p.raw for p in hf.prompts]
    assert [p.stats for p in vl.prompts] == [p.stats for p in hf.prompts]


def test_dflash_short_block_in_vllm_equals_specforge_eval(tmp_path):
    """K = 3 < block_size - 1 = 7: vLLM drafts with a 1 + K = 4-slot query block, and so must
    ``specforge eval`` (the 4 extra MASK slots of a whole block change every slot's logits)."""
    from specforge_dflash.export import load_export
    from specforge_dflash.plugin import DFlashOptions, make_dflash
    from specforge_vllm.eval_engine import speculative_method
    from test_dflash import _overfit_draft, _slow_speculation
    from transformers import AutoModelForCausalLM

    from specforge_core.evaluation.evaluate import evaluate
    from specforge_core.export import write_export

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    prompts = [[1, 7, 300, 42, 9, 77], [1, 5, 600, 601, 33], [1, 12, 800, 14, 15, 16, 17]]
    K, M = 3, 24
    with torch.no_grad():
        seqs = [model.generate(torch.tensor([p]), max_new_tokens=M + K, do_sample=False, eos_token_id=None
                               )[0].tolist() for p in prompts]
    greedy = [s[len(p): len(p) + M] for s, p in zip(seqs, prompts, strict=True)]
    alg = make_dflash(DFlashOptions(block_size=8, num_layers=2, loss_decay=0.0, anchor_stride=1,
                                    train_block_lengths=[K + 1]))
    draft, d2t = load_export(_overfit_draft(model, seqs, alg, tmp_path))
    with torch.no_grad():  # one k_norm for every layer: vLLM 0.32's CPU context-key deviation cannot act
        for layer in draft.layers[1:]:
            layer.self_attn.k_norm.weight.copy_(draft.layers[0].self_attn.k_norm.weight)
    vocab = type("V", (), {"d2t": d2t - torch.arange(d2t.numel()), "t2d": torch.ones(d2t.numel(), dtype=torch.bool)})
    config, tensors = alg.export(draft, vocab)
    assert config["block_size"] == 8
    export = write_export(config, tensors, tmp_path / "export-b8")
    draft, _ = load_export(export)
    ours = [_slow_speculation(model, draft, d2t, p, K, M)[0] for p in prompts]  # 1 + K slots
    served = _serve(tmp_path, draft=str(export), method="dflash", k=K, prompts=prompts, max_new=M)
    assert served["outputs"] == greedy and served["per_step_accepted"] == ours
    assert sum(a >= 2 for v in ours for a in v) > 0  # drafts beyond the first are accepted

    assert speculative_method(export) == "dflash"
    kw = dict(steps=K, max_new_tokens=M, eos_ids=(), dtype="fp32")
    hf = evaluate(str(export), str(TINY), prompts, device="cpu", **kw)
    vl = evaluate(str(export), str(TINY), prompts, engine="vllm", engine_python=PYTHON, **kw)
    assert hf.ok and vl.ok, (hf.errors, vl.errors)
    assert [p.raw for p in vl.prompts] == [p.raw for p in hf.prompts]
    assert [p.stats for p in vl.prompts] == [p.stats for p in hf.prompts]


def test_eagle31_fc_norm_export_loads_in_vllm(tmp_path):
    from test_dflash_eagle31 import eagle31_export

    export, weights = eagle31_export(tmp_path)
    served = _serve(tmp_path, draft=str(export), method="eagle3", k=3, prompts=[[1, 7, 300, 42, 9, 77]], max_new=8,
                    fc_norm=True)
    assert len(served["fc_norm"]) == len(weights)
    for got, want in zip(served["fc_norm"], weights, strict=True):
        torch.testing.assert_close(torch.tensor(got), want.to(torch.bfloat16).float())  # exported as bf16
