"""DSpark export in the layout vLLM's ``dspark`` method loads (``Qwen3DSparkModel`` ->
``vllm/model_executor/models/qwen3_dspark.py``, a ``DFlashQwen3Model`` with two more heads):

config.json: the DFlash export's config (``specforge_dflash.export``: Qwen3 draft config,
``block_size``, ``draft_vocab_size``, ``dflash_config`` = {``mask_token_id``, ``target_layer_ids``})
with ``architectures = ["Qwen3DSparkModel"]``, ``markov_rank``, ``markov_head_type = "vanilla"``
(the only head vLLM's Qwen3 DSpark runs), ``enable_confidence_head``,
``confidence_head_with_markov`` and ``sample_from_anchor = true`` (N query slots draft N tokens).

model.safetensors: the DFlash tensors plus ``markov_head.markov_w1.weight`` [V, r],
``markov_head.markov_w2.weight`` [Vd, r], ``confidence_head.proj.weight`` [1, H (+ r)] and
``confidence_head.proj.bias`` [1] (vLLM prefixes ``model.`` to each, as for the backbone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from specforge_dflash.export import config_from_export, export_config, export_tensors

from specforge_dspark.model import DSparkDraft, DSparkHeads

ARCHITECTURE = "Qwen3DSparkModel"


def dspark_config(draft: DSparkDraft, aux_layer_ids: list[int]) -> dict[str, Any]:
    cfg = export_config(draft.config, aux_layer_ids)
    h = draft.heads
    cfg.update({"architectures": [ARCHITECTURE], "markov_rank": h.markov_rank, "markov_head_type": "vanilla",
                "enable_confidence_head": h.confidence_head,
                "confidence_head_with_markov": h.confidence_head and h.confidence_head_with_markov,
                "sample_from_anchor": True})
    return cfg


def dspark_tensors(draft: DSparkDraft, vocab: Any) -> dict[str, torch.Tensor]:
    state = export_tensors(draft, vocab)
    if draft.confidence_head is not None:  # vLLM keeps this head in fp32
        for n in ("weight", "bias"):
            state[f"confidence_head.proj.{n}"] = getattr(draft.confidence_head.proj, n).detach().cpu().float().contiguous()
    return state


def load_export(export_dir: str | Path, embed_weight: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[DSparkDraft, torch.Tensor]:
    """(draft, draft_to_target int64 [Vd]) from an export directory."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("architectures") != [ARCHITECTURE]:
        raise ValueError(f"{d / 'config.json'}: architectures {cfg.get('architectures')}; a dspark export has "
                         f"[{ARCHITECTURE!r}]")
    if not cfg.get("sample_from_anchor", True) or cfg.get("markov_head_type", "vanilla") != "vanilla":
        raise ValueError(f"{d / 'config.json'}: only sample_from_anchor = true with a vanilla Markov head is "
                         "supported (what vLLM's Qwen3 DSpark serves)")
    c, aux = config_from_export(cfg)
    rank = cfg.get("markov_rank")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{d / 'config.json'}: markov_rank = {rank!r}; a positive integer is allowed")
    heads = DSparkHeads(markov_rank=rank, confidence_head=bool(cfg.get("enable_confidence_head", False)),
                        confidence_head_with_markov=bool(cfg.get("confidence_head_with_markov", False)))
    state = load_file(str(d / "model.safetensors"))
    d2t = state.pop("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
    state.pop("t2d", None)
    if "embed_tokens.weight" not in state:
        if embed_weight is None:
            raise ValueError(f"{d}: no embed_tokens.weight in the export and no target embedding given")
        state["embed_tokens.weight"] = embed_weight
    draft = DSparkDraft(c, heads)
    missing, unexpected = draft.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: weights do not match a dspark draft (missing {missing}, unexpected {unexpected})")
    draft.aux_layer_ids = aux
    return draft.to(dtype), torch.arange(c.draft_vocab_size, dtype=torch.int64) + d2t.to(torch.int64)
