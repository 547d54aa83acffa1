"""SafeAILab/EAGLE's own client as a reference: ``EaModel.eagenerate`` (EAGLE-3 dynamic trees,
greedy) on a target and an exported draft, recording the accepted length of every cycle.

EAGLE's code targets transformers 4.x; three shims let it run on the project's transformers 5
without changing what it computes: the other model families' modules (not used) are stubbed out,
rope's "default" init function (removed in 5.x) is provided, and the target's non-persistent rope
buffers, which 5.x leaves uninitialised when loading EAGLE's model class, are recomputed. EAGLE
reads the target's embedding through ``model.safetensors.index.json``, so a copy of the target
gets one. Tree settings: our (topk, depth, tokens) = EAGLE's (top_k, depth - 1, total_token).
"""
import json
import shutil
import sys
import types
from pathlib import Path

import torch


def load_eagle(src: str):
    sys.path.insert(0, src)
    for m in ("modeling_mixtral_kv", "modeling_qwen2_kv", "modeling_qwen3_kv"):  # other families; not needed
        mod = types.ModuleType("eagle.model." + m)
        for n in ("MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            setattr(mod, n, None)
        sys.modules["eagle.model." + m] = mod
    import eagle.model.ea_model as ea
    import eagle.model.modeling_llama_kv as kv

    def default_rope(config, device=None, **_):
        # transformers >= 5 dropped the "default" entry EAGLE's Llama-3.1 rope path looks up
        theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
        return inv, 1.0
    kv.ROPE_INIT_FUNCTIONS = {**kv.ROPE_INIT_FUNCTIONS, "default": default_rope}
    orig = ea.EConfig.from_pretrained

    def econfig(*a, **k):
        # transformers >= 5 turns "rope_scaling": null into {"rope_type": "default", ...}; EAGLE's
        # draft reads None as plain rope
        cfg = orig(*a, **k)
        rs = getattr(cfg, "rope_scaling", None)
        if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
            cfg.rope_theta = getattr(cfg, "rope_theta", None) or rs.get("rope_theta", 10000.0)
            cfg.rope_scaling = None
        return cfg
    ea.EConfig.from_pretrained = econfig
    return ea


def eagle_accept_lengths(src, target, draft, prompts, topk, depth, tokens, max_new_tokens, workdir) -> list[dict]:
    """Per prompt: ``accepted`` drafts of every cycle and the generated ``output`` (no EOS stop)."""
    ea = load_eagle(src)
    tgt = Path(workdir) / "target"
    if not tgt.exists():
        shutil.copytree(target, tgt)
        from safetensors import safe_open
        with safe_open(str(tgt / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        (tgt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keys}}))

    class Tok:  # EAGLE only reads eos_token_id in eagenerate
        eos_token_id = -7
    ea.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: Tok())
    model = ea.EaModel.from_pretrained(use_eagle3=True, base_model_path=str(tgt), ea_model_path=str(draft),
                                       total_token=tokens, depth=depth - 1, top_k=topk, torch_dtype=torch.float32)
    model.eval()
    # transformers >= 5 leaves the non-persistent rope buffers of EAGLE's target uninitialised: recompute them
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_init_fn"):
            mod.inv_freq = mod.rope_init_fn(mod.config, mod.inv_freq.device)[0]
            mod.original_inv_freq = mod.inv_freq
    record = []
    orig = ea.evaluate_posterior

    def spy(logits, candidates, logits_processor):
        out = orig(logits, candidates, logits_processor)
        record.append(int(out[1]))
        return out
    ea.evaluate_posterior = spy
    result = []
    for p in prompts:
        record.clear()
        ids = torch.tensor([p])
        out = model.eagenerate(ids, temperature=0.0, max_new_tokens=max_new_tokens + 4, max_length=len(p) + max_new_tokens + 6 * tokens + 64)
        result.append({"accepted": list(record), "output": out[0, len(p):].tolist()})
    ea.evaluate_posterior = orig
    return result


