"""The target model for evaluation: greedy tokens and EAGLE-3 aux features from one HF model.

Features follow the training capture convention: aux layer id i is HF ``hidden_states[i]`` (the
residual stream entering decoder layer i), concatenated low -> high. The KV cache is a transformers
``DynamicCache``; rejected drafts are rolled back with ``crop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from specforge_core.dtypes import TORCH as DTYPES  # the one table of dtype names


def _cache_arg(model, cache) -> dict:
    """The KV cache keyword of this transformers version: newer ones call it ``cache`` and warn on
    every call that passes ``past_key_values`` (a FutureWarning on every eval forward)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


class TargetModel:
    def __init__(self, model_path: str, aux_layer_ids: Sequence[int], device: str = "cpu",
                 dtype: str = "fp32", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not known; allowed: {', '.join(DTYPES)}")
        self.path = model_path
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device).eval().requires_grad_(False)
        self.aux_layer_ids = list(aux_layer_ids)
        # Sliding-window layers (Gemma 2/3): the batched path masks them itself (forward_rows)
        cfg = self.model.config
        sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
        self.sliding_window = int(getattr(cfg, "sliding_window", None) or 0) if sliding else 0

    # ---- EvalTarget (components.py): what a proposer may read
    @property
    def hf_config(self) -> dict:
        return self.model.config.to_dict()

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def lm_head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def new_cache(self):
        from transformers import DynamicCache

        if self.sliding_window:
            # every layer keeps every entry: forward_rows' masks index the whole cache (a sliding
            # layer's own cache keeps only the last window - 1 entries, holes included)
            return DynamicCache()
        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(self, ids: Sequence[int] | torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``ids`` (appended after what ``cache`` holds). Returns (greedy next token at every
        position [S] int64, aux features [S, n_aux * H])."""
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device)[None]
        out = self.model(input_ids=ids, **_cache_arg(self.model, cache), use_cache=cache is not None,
                         output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i][0] for i in self.aux_layer_ids], dim=-1)
        return out.logits[0].argmax(-1), aux

    @torch.no_grad()
    def forward_rows(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache,
                     logits: bool = False, key_positions: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched forward of ``ids`` [B, S] at rope ``positions`` [B, S], appended to ``cache``;
        ``mask`` bool [B, S, L] says which of the L = cached + S entries each new token attends
        to. Returns (greedy token [B, S], or with ``logits`` the logits [B, S, V]; aux features
        [B, S, n_aux * H]). A target with sliding-window layers also needs ``key_positions`` [B, L],
        the rope position of every cache entry: its sliding layers see only keys less than the
        window behind the query (a given 4D mask would otherwise reach every layer as is)."""
        attn = mask[:, None]
        if self.sliding_window:
            if key_positions is None:
                raise ValueError("this target has sliding-window layers: forward_rows needs key_positions")
            near = positions[:, :, None] - key_positions[:, None, :] < self.sliding_window
            attn = {"full_attention": attn, "sliding_attention": (mask & near)[:, None]}
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=attn,
                         **_cache_arg(self.model, cache), use_cache=True, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in self.aux_layer_ids], dim=-1)
        return (out.logits if logits else out.logits.argmax(-1)), aux

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
        """Plain greedy decoding, one token per forward: the reference speculation must equal."""
        cache = self.new_cache()
        nxt, _ = self.forward(prompt, cache)
        out = [int(nxt[-1])]
        while len(out) < max_new_tokens and out[-1] not in eos_ids:
            nxt, _ = self.forward([out[-1]], cache)
            out.append(int(nxt[-1]))
        return out


def eos_token_ids(model_path: str, tokenizer=None, extra: Optional[Sequence[int]] = None) -> list[int]:
    """Stop tokens: the target's generation_config / config ``eos_token_id`` plus the tokenizer's."""
    import json
    from pathlib import Path

    ids: set[int] = set(extra or ())

    def add(v) -> None:
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])

    if Path(model_path).is_dir():
        for name in ("generation_config.json", "config.json"):
            p = Path(model_path) / name
            if p.is_file():
                add(json.loads(p.read_text()).get("eos_token_id"))
    else:  # a hub id: through transformers (honours HF_HUB_OFFLINE and the local cache)
        from transformers import AutoConfig, GenerationConfig

        add(AutoConfig.from_pretrained(model_path).to_dict().get("eos_token_id"))
        try:
            add(GenerationConfig.from_pretrained(model_path).eos_token_id)
        except OSError:  # no generation_config.json
            pass
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
