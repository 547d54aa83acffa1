"""The DSpark proposer for ``specforge eval`` (``specforge_core.components.Proposer``), as vLLM's
``DSparkSpeculator`` drafts greedily with ``num_speculative_tokens = k``:

one backbone forward of the query block [x[n], MASK x (k-1)] (k slots at positions n..n+k-1, over
the row's n context states), then a sequential pass over the k slots: slot i's draft is
argmax(lm_head(h_i) + markov_w2(markov_w1[prev])), prev = x[n] for slot 0, else slot i-1's draft
(as a target id). Context bookkeeping is DFlash's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from specforge_dflash.proposer import DFlashProposer

from specforge_core.plugin_api import input_embedding_scale
from specforge_dspark.export import load_export
from specforge_dspark.model import DSparkDraft


class DSparkProposer(DFlashProposer):
    draft: DSparkDraft

    @torch.no_grad()
    def propose(self, k: int) -> list[list[int]]:
        N = self.draft.config.block_size
        if not 1 <= k <= N:
            raise ValueError(f"a dspark block of block_size {N} proposes at most {N} tokens per cycle; "
                             f"asked for {k} (eval.steps / --steps)")
        R = len(self.ctx)
        n = torch.tensor([c.shape[0] for c in self.ctx], device=self.device)
        C = max(int(n.max()), 1)
        ctx = torch.zeros(R, C, self.draft.config.hidden_size, dtype=self.draft.fc.weight.dtype, device=self.device)
        for r, c in enumerate(self.ctx):
            ctx[r, : c.shape[0]] = c
        ctx_pos = torch.arange(C, device=self.device).expand(R, -1)
        visible = (ctx_pos < n[:, None])[:, None, :]
        prev = torch.tensor(self.last, device=self.device)
        ids = self.draft.block_ids(prev, k)[:, None]  # [R, 1, k]
        pos = (n[:, None] + torch.arange(k, device=self.device))[:, None]
        hidden = self.draft(ids, pos, ctx, ctx_pos, visible)[:, 0]  # [R, k, H]
        out = []
        for i in range(k):
            tok = self.draft_to_target[self.draft.logits(hidden[:, i], self.draft.markov_embed(prev)).argmax(-1)]
            out.append(tok)
            prev = tok
        return torch.stack(out, 1).tolist()


def make_proposer(export_dir: str | Path, target: Any, device: Any) -> DSparkProposer:
    embed = target.embedding().detach().float().cpu() * input_embedding_scale(target.hf_config)  # as training
    draft, d2t = load_export(export_dir, embed_weight=embed, dtype=target.dtype)
    width = draft.fc.weight.shape[1]
    want = len(draft.aux_layer_ids) * int(target.hf_config["hidden_size"])
    if width != want:
        raise ValueError(f"{export_dir}: the draft's fc takes {width} features but {len(draft.aux_layer_ids)} "
                         f"target layers of this target give {want}")
    return DSparkProposer(draft.to(device), d2t, device)
