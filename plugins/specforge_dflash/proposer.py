"""The DFlash block proposer for ``specforge eval`` (``specforge_core.components.Proposer``).

Per row it keeps the context states ``hidden_norm(fc(f[p]))`` of every committed position (one
entry per feature ``observe`` receives) and the last committed token x[n]. ``propose(k)`` runs ONE
forward of the query block [x[n], MASK x k] at positions n..n+k over the row's n context states
and returns the argmax of slots 1..k (k <= block_size - 1). That is vLLM's ``dflash`` method with
``num_speculative_tokens = k``: it builds 1 + k query slots, not block_size, and since the block
attends bidirectionally the number of MASK slots changes every slot's logits. Rows are batched
with their contexts right-padded (padding is invisible to every query).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specforge_core.plugin_api import input_embedding_scale
from specforge_dflash.export import load_export
from specforge_dflash.model import DFlashDraft


class DFlashProposer:
    def __init__(self, draft: DFlashDraft, draft_to_target: torch.Tensor, device: Any):
        self.draft, self.device = draft.eval(), torch.device(device)
        self.draft_to_target = draft_to_target.to(self.device)
        self.aux_layers = list(getattr(draft, "aux_layer_ids", []) or []) or None
        self.begin([])

    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        self.ctx: list[torch.Tensor] = [self._empty() for _ in prompts]
        self.last = [int(p[-1]) if len(p) else 0 for p in prompts]

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0, self.draft.config.hidden_size, dtype=self.draft.fc.weight.dtype, device=self.device)

    @torch.no_grad()
    def observe(self, tokens: Sequence[Sequence[int]], features: Sequence[torch.Tensor]) -> None:
        for r, (t, f) in enumerate(zip(tokens, features, strict=True)):
            self.ctx[r] = torch.cat([self.ctx[r], self.draft.context(f.to(self.device))])
            self.last[r] = int(t[-1])

    @torch.no_grad()
    def propose(self, k: int) -> list[list[int]]:
        B = self.draft.config.block_size
        if not 1 <= k <= B - 1:
            raise ValueError(f"a dflash block of block_size {B} proposes at most {B - 1} tokens per cycle; "
                             f"asked for {k} (eval.steps / --steps)")
        R = len(self.ctx)
        n = torch.tensor([c.shape[0] for c in self.ctx], device=self.device)
        C = max(int(n.max()), 1)
        ctx = torch.zeros(R, C, self.draft.config.hidden_size, dtype=self.draft.fc.weight.dtype, device=self.device)
        for r, c in enumerate(self.ctx):
            ctx[r, : c.shape[0]] = c
        ctx_pos = torch.arange(C, device=self.device).expand(R, -1)
        visible = (ctx_pos < n[:, None])[:, None, :]  # [R, 1, C]
        ids = self.draft.block_ids(torch.tensor(self.last, device=self.device), k + 1)[:, None]  # [R, 1, k+1]
        pos = (n[:, None] + torch.arange(k + 1, device=self.device))[:, None]
        hidden = self.draft(ids, pos, ctx, ctx_pos, visible)[:, 0, 1:]  # [R, k, H]
        return self.draft_to_target[self.draft.lm_head(hidden).argmax(-1)].tolist()

    def keep(self, rows: Sequence[int]) -> None:
        self.ctx = [self.ctx[r] for r in rows]
        self.last = [self.last[r] for r in rows]


def make_proposer(export_dir: str | Path, target: Any, device: Any) -> DFlashProposer:
    # an export without its own table reads the target's rows as its layers do (training's convention)
    embed = target.embedding().detach().float().cpu() * input_embedding_scale(target.hf_config)
    draft, d2t = load_export(export_dir, embed_weight=embed, dtype=target.dtype)
    width = draft.fc.weight.shape[1]
    want = len(draft.aux_layer_ids) * int(target.hf_config["hidden_size"])
    if width != want:
        raise ValueError(f"{export_dir}: the draft's fc takes {width} features but {len(draft.aux_layer_ids)} "
                         f"target layers of this target give {want}")
    return DFlashProposer(draft.to(device), d2t, device)
