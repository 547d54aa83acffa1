"""P-EAGLE export in the layout vLLM serves as an EAGLE-3 draft with parallel drafting
(``speculative_config = {"method": "eagle3", "parallel_drafting": true, ...}``; vLLM's
``Eagle3LlamaForCausalLM`` in ``vllm/model_executor/models/llama_eagle3.py``, drafting in
``vllm/v1/spec_decode/llm_base_proposer.py``):

config.json: a Llama config of the draft (``architectures`` = ["Eagle3LlamaForCausalLM"], which no
EAGLE-3 chain export writes;
``num_hidden_layers`` = draft layers: vLLM gives layer 0 the 2H q/k/v input, the others H),
``vocab_size`` (the target's), ``draft_vocab_size``, ``target_hidden_size``, the aux layers
(``eagle_aux_hidden_state_layer_ids``, HF hidden_states indices, what vLLM V1 captures, and
``num_aux_hidden_states``), rope written out (default rope, the target's theta, as trained), and
``mask_token_id`` (vLLM's token for the masked slots). ``parallel_drafting = true`` marks the
export for ``specforge eval --engine vllm`` (vLLM itself takes the flag from the speculative config).

model.safetensors (bf16): ``fc``, ``layers.N.*`` (``layers.0.hidden_norm``), ``norm``, ``lm_head``,
``embed_tokens`` (P-EAGLE trains it; vLLM keeps a draft's own embedding when it differs from the
target's), ``mask_hidden`` [1, num_aux*Ht] (vLLM: the feature of every masked slot, projected by
fc), and ``d2t`` (int64 offsets: target id = draft id + d2t) / ``t2d`` only when the draft vocab is
smaller than the target's (vLLM allocates ``draft_id_to_target_id`` only then).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specforge_peagle.model import PEagleConfig, PEagleDraft

# vLLM's eagle3 method accepts only architectures named Eagle3* / *Eagle3 (transformers_utils/configs/
# eagle.py); this one is its class's own name, distinct from the EAGLE-3 chain export's
# LlamaForCausalLMEagle3 so that `specforge eval --draft DIR` finds the P-EAGLE proposer.
ARCHITECTURE = "Eagle3LlamaForCausalLM"
MARKER = "parallel_drafting"


def export_config(c: PEagleConfig, aux_layer_ids: list[int]) -> dict[str, Any]:
    ids = [int(i) for i in aux_layer_ids]
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size, "torch_dtype": "bfloat16",
        "eagle_aux_hidden_state_layer_ids": ids, "num_aux_hidden_states": len(ids),
        "eagle_config": {"use_aux_hidden_state": True},
        "mask_token_id": c.mask_token_id, MARKER: True,
        "peagle": {"num_depths": c.num_depths},  # K trained: vLLM may serve any K, best up to this
    }


def export_tensors(draft: PEagleDraft, vocab: Any) -> dict[str, torch.Tensor]:
    c = draft.config
    if c.draft_vocab_size != int(vocab.d2t.numel()):
        raise ValueError(f"export: draft lm_head has {c.draft_vocab_size} rows but the vocab mapping has "
                         f"{vocab.d2t.numel()} draft ids")
    state = {k: v.detach().cpu().to(torch.bfloat16).contiguous() for k, v in draft.state_dict().items()}
    if c.draft_vocab_size < c.vocab_size:
        state["d2t"] = vocab.d2t.detach().cpu().to(torch.int64).contiguous()
        state["t2d"] = vocab.t2d.detach().cpu().to(torch.bool).contiguous()
    return state


def config_from_export(cfg: dict) -> tuple[PEagleConfig, list[int]]:
    """(draft config, HF aux layer ids) of an exported config.json dict."""
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    if not ids or cfg.get("mask_token_id") is None:
        raise ValueError("config.json: a p-eagle export needs eagle_aux_hidden_state_layer_ids and mask_token_id")
    H, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    c = PEagleConfig(
        hidden_size=H, intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=nh, num_key_value_heads=int(cfg.get("num_key_value_heads") or nh),
        head_dim=int(cfg.get("head_dim") or H // nh), vocab_size=int(cfg["vocab_size"]),
        draft_vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
        target_hidden_size=int(cfg.get("target_hidden_size") or H), num_aux=len(ids),
        num_depths=int((cfg.get("peagle") or {}).get("num_depths", 2)), mask_token_id=int(cfg["mask_token_id"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)))
    return c, [int(i) for i in ids]


def load_export(export_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PEagleDraft, torch.Tensor]:
    """(draft, draft_to_target int64 [Vd]) from an export directory."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    c, aux = config_from_export(json.loads((d / "config.json").read_text()))
    state = load_file(str(d / "model.safetensors"))
    d2t = state.pop("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
    state.pop("t2d", None)
    draft = PEagleDraft(c)
    missing, unexpected = draft.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: weights do not match a p-eagle draft (missing {missing}, unexpected {unexpected})")
    draft.aux_layer_ids = aux
    return draft.to(dtype), torch.arange(c.draft_vocab_size, dtype=torch.int64) + d2t.to(torch.int64)
