"""DFlash export in the layout vLLM's ``dflash`` method loads (``DFlashDraftModel`` ->
``vllm/model_executor/models/qwen3_dflash.py``; the same config keys as z-lab's checkpoints):

config.json: a Qwen3 config of the draft (``num_hidden_layers`` = draft layers, ``vocab_size`` =
the target's), ``block_size``, ``draft_vocab_size``, and ``dflash_config`` = {``mask_token_id``,
``target_layer_ids``}. ``target_layer_ids`` are 0-based target *layer outputs*: HF hidden_states
index i+1 (vLLM adds the 1 back, ``get_eagle3_aux_layers_from_config``).

model.safetensors: the draft's own names (``fc``, ``hidden_norm``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``q_norm``/``k_norm``, ``layers.N.mlp.*``, ``norm``, ``lm_head``, ``embed_tokens``) in bf16; plus
``d2t`` (int64 offsets: target id = draft id + d2t) and ``t2d`` only when the draft vocabulary is
smaller than the target's (vLLM then allocates ``draft_id_to_target_id``; with equal vocabularies
a ``d2t`` tensor would be an unexpected weight).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specforge_dflash.model import DFlashConfig, DFlashDraft

ARCHITECTURE = "DFlashDraftModel"


def export_config(c: DFlashConfig, aux_layer_ids: list[int]) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "max_position_embeddings": c.max_position_embeddings, "attention_bias": False,
        "tie_word_embeddings": False, "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size, "block_size": c.block_size, "torch_dtype": "bfloat16",
        "dflash_config": {"mask_token_id": c.mask_token_id,
                          "target_layer_ids": [int(i) - 1 for i in aux_layer_ids]},
    }


def export_tensors(draft: DFlashDraft, vocab: Any) -> dict[str, torch.Tensor]:
    c = draft.config
    if c.draft_vocab_size != int(vocab.d2t.numel()):
        raise ValueError(f"export: draft lm_head has {c.draft_vocab_size} rows but the vocab mapping has "
                         f"{vocab.d2t.numel()} draft ids")
    state = {k: v.detach().cpu().to(torch.bfloat16).contiguous() for k, v in draft.state_dict().items()}
    if c.draft_vocab_size < c.vocab_size:
        state["d2t"] = vocab.d2t.detach().cpu().to(torch.int64).contiguous()
        state["t2d"] = vocab.t2d.detach().cpu().to(torch.bool).contiguous()
    return state


def config_from_export(cfg: dict) -> tuple[DFlashConfig, list[int]]:
    """(draft config, HF aux layer ids) of an exported config.json dict."""
    dc = cfg.get("dflash_config") or {}
    ids = dc.get("target_layer_ids")
    if not ids or dc.get("mask_token_id") is None:
        raise ValueError("config.json: dflash_config needs target_layer_ids and mask_token_id")
    H, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    c = DFlashConfig(
        hidden_size=H, intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=nh, num_key_value_heads=int(cfg.get("num_key_value_heads") or nh),
        head_dim=int(cfg.get("head_dim") or H // nh), vocab_size=int(cfg["vocab_size"]),
        draft_vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
        target_hidden_size=int(cfg.get("target_hidden_size") or H), num_aux=len(ids),
        block_size=int(cfg["block_size"]), mask_token_id=int(dc["mask_token_id"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)))
    return c, [int(i) + 1 for i in ids]


def load_export(export_dir: str | Path, embed_weight: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[DFlashDraft, torch.Tensor]:
    """(draft, draft_to_target int64 [Vd]) from an export directory; ``embed_weight`` fills the
    embedding when the export has none."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    c, aux = config_from_export(json.loads((d / "config.json").read_text()))
    state = load_file(str(d / "model.safetensors"))
    d2t = state.pop("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
    state.pop("t2d", None)
    if "embed_tokens.weight" not in state:
        if embed_weight is None:
            raise ValueError(f"{d}: no embed_tokens.weight in the export and no target embedding given")
        state["embed_tokens.weight"] = embed_weight
    draft = DFlashDraft(c)
    missing, unexpected = draft.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: weights do not match a dflash draft (missing {missing}, unexpected {unexpected})")
    draft.aux_layer_ids = aux
    return draft.to(dtype), torch.arange(c.draft_vocab_size, dtype=torch.int64) + d2t.to(torch.int64)
