"""The mlp-head proposer for ``specforge eval`` (``specforge_core.components.Proposer``).

The head reads the target's features f[p] (the aux states at position p, the ones that predicted
x[p+1]) and predicts x[p+2]. After a cycle the row has committed x[0..n] with features f[0..n-1]:
x[n] came from the target, so ``head(f[n-1])`` drafts x[n+1]. One head drafts one token per
cycle (Medusa would add a head per further token); ``propose(k)`` with k > 1 is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class MLPHeadProposer:
    def __init__(self, fc: torch.Tensor, lm_head: torch.Tensor, draft_to_target: torch.Tensor,
                 aux_layers: list[int]):
        self.fc, self.lm_head, self.draft_to_target = fc, lm_head, draft_to_target
        self.aux_layers = aux_layers  # what eval captures for ``observe``
        self.last: list[torch.Tensor] = []

    def _draft(self, features: torch.Tensor) -> torch.Tensor:
        """Target ids the head predicts two tokens after each row of ``features`` [N, F]."""
        hidden = torch.nn.functional.silu(features.to(self.fc.dtype) @ self.fc.T)
        return self.draft_to_target[(hidden @ self.lm_head.T).argmax(-1)]

    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        self.last = [torch.empty(0) for _ in prompts]

    @torch.no_grad()
    def observe(self, tokens: Sequence[Sequence[int]], features: Sequence[torch.Tensor]) -> None:
        self.last = [f[-1] for f in features]  # only the newest feature f[n-1] drafts

    @torch.no_grad()
    def propose(self, k: int) -> list[list[int]]:
        if k != 1:
            raise ValueError(f"an mlp-head draft proposes 1 token per cycle; asked for {k} (use --steps 1 / "
                             "eval.steps = 1)")
        return [[int(t)] for t in self._draft(torch.stack(self.last)).tolist()]

    def keep(self, rows: Sequence[int]) -> None:
        self.last = [self.last[r] for r in rows]

    @torch.no_grad()
    def teacher_forced(self, tokens: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
        """int64 [k, T]: column t = the draft after x[0..t+1] with features f[0..t]."""
        if k != 1:
            raise ValueError(f"an mlp-head draft proposes 1 token per cycle; asked for {k}")
        return self._draft(features)[None]


def make_proposer(export_dir: str | Path, target: Any, device: Any) -> MLPHeadProposer:
    from safetensors.torch import load_file

    d = Path(export_dir)
    cfg = json.loads((d / "config.json").read_text())
    layers = [int(i) for i in cfg.get("aux_layer_ids") or []]
    if not layers:
        raise ValueError(f"{d / 'config.json'}: no aux_layer_ids (exported by an older specforge-mlp-head?)")
    if int(cfg["input_size"]) != len(layers) * int(target.hf_config["hidden_size"]):
        raise ValueError(f"{d}: the head takes {cfg['input_size']} features but {len(layers)} layers of this "
                         f"target give {len(layers) * int(target.hf_config['hidden_size'])}")
    t = load_file(str(d / "model.safetensors"))
    dtype = target.dtype
    d2t = t["d2t"].to(torch.int64)
    draft_to_target = torch.arange(d2t.numel(), dtype=torch.int64) + d2t
    return MLPHeadProposer(t["fc.weight"].to(device, dtype), t["lm_head.weight"].to(device, dtype),
                           draft_to_target.to(device), layers)
