"""The P-EAGLE proposer for ``specforge eval`` (``specforge_core.components.Proposer``).

Per row it keeps the committed tokens x[0..n] and the target features f[0..n-1]. ``propose(k)`` runs
ONE forward over the row's elements in causal order, as vLLM's parallel drafter does:

    (x[p+1], f[p]) at position p, p = 0..n-1,   then k-1 masked slots at positions n..n+k-2

and returns the argmax at the last entry and at every slot (k drafts). vLLM keeps the entries'
keys/values in its KV cache; this recomputes them each cycle (the same values: every entry sees
only entries before it). Rows are right-padded; padding comes after every real element.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specforge_peagle.export import load_export
from specforge_peagle.model import PEagleDraft


class PEagleProposer:
    def __init__(self, draft: PEagleDraft, draft_to_target: torch.Tensor, device: Any):
        self.draft, self.device = draft.eval(), torch.device(device)
        self.draft_to_target = draft_to_target.to(self.device)
        self.aux_layers = list(getattr(draft, "aux_layer_ids", []) or []) or None
        self.begin([])

    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        # x[0] only: the prefill's ``observe`` brings x[1..P] with f[0..P-1] (components.Proposer)
        self.tokens: list[list[int]] = [[int(p[0])] if len(p) else [] for p in prompts]
        w = self.draft.fc.weight
        self.feats: list[torch.Tensor] = [torch.zeros(0, w.shape[1], dtype=w.dtype, device=self.device)
                                          for _ in prompts]

    def observe(self, tokens: Sequence[Sequence[int]], features: Sequence[torch.Tensor]) -> None:
        for r, (t, f) in enumerate(zip(tokens, features, strict=True)):
            self.tokens[r].extend(int(x) for x in t)
            self.feats[r] = torch.cat([self.feats[r], f.to(self.device, self.feats[r].dtype)])

    @torch.no_grad()
    def propose(self, k: int) -> list[list[int]]:
        if k < 1:
            raise ValueError(f"p-eagle proposes at least one token per cycle; asked for {k}")
        c, dev = self.draft.config, self.device
        R = len(self.tokens)
        n = [f.shape[0] for f in self.feats]  # entries per row (x[n] is the last committed token)
        L = max(n) + k - 1
        ids = torch.full((R, L), c.mask_token_id, dtype=torch.long, device=dev)
        w = self.draft.fc.weight
        feats = torch.zeros(R, L, w.shape[1], dtype=w.dtype, device=dev)
        is_mask = torch.ones(R, L, dtype=torch.bool, device=dev)
        for r in range(R):
            ids[r, : n[r]] = torch.tensor(self.tokens[r][1: n[r] + 1], device=dev)
            feats[r, : n[r]] = self.feats[r]
            is_mask[r, : n[r]] = False
        pos = torch.arange(L, device=dev).expand(R, -1)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril().expand(R, -1, -1)
        hidden = self.draft(ids, feats, is_mask, pos, causal)  # [R, L, H]
        at = torch.tensor(n, device=dev)[:, None] - 1 + torch.arange(k, device=dev)  # [R, k]
        out = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.draft_to_target[self.draft.lm_head(out).argmax(-1)].tolist()

    def keep(self, rows: Sequence[int]) -> None:
        self.tokens = [self.tokens[r] for r in rows]
        self.feats = [self.feats[r] for r in rows]


def make_proposer(export_dir: str | Path, target: Any, device: Any) -> PEagleProposer:
    draft, d2t = load_export(export_dir, dtype=target.dtype)
    width = draft.fc.weight.shape[1]
    want = len(draft.aux_layer_ids) * int(target.hf_config["hidden_size"])
    if width != want:
        raise ValueError(f"{export_dir}: the draft's fc takes {width} features but {len(draft.aux_layer_ids)} "
                         f"target layers of this target give {want}")
    return PEagleProposer(draft.to(device), d2t, device)
