"""Several prompts through the target at once, each with its own sequence, in one shared KV cache.

Rows advance in lockstep: every forward appends S entries to every row of a transformers
``DynamicCache``. A row that needs fewer (a shorter prompt, fewer committed tokens) pads, and
rejected drafts are *not* cropped (other rows keep theirs): their entries become holes that no
later token attends to. So each row is its own sequence, with its own rope positions, exactly as
if it ran alone; only the cache layout is shared.

``valid`` [B, L] marks the entries that belong to a row's committed sequence; the attention mask
of a new token is "valid entries before it, plus the new tokens of its row up to itself". A padded
token still attends to itself (a query with no key would give NaN, and NaN * 0 still poisons).

A draft *tree* is appended the same way with a tree mask (a node sees its ancestors) and rope
position = committed length + depth; after verification the accepted path's entries stay valid
and every other node becomes a hole, so the row again holds exactly its committed sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from specforge_core.evaluation.target import TargetModel
from specforge_core.evaluation.tree import DraftTree, ancestor_mask


class TargetBatch:
    def __init__(self, target: TargetModel):
        self.target = target
        self.cache = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=target.device)  # [B, L]
        self.kpos = torch.zeros(0, 0, dtype=torch.int64, device=target.device)  # [B, L] entries' rope positions
        self.lengths: list[int] = []  # committed entries per row = next rope position

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the prompts (left-padded). Returns each row's logits at its last prompt token [B, V]
        (its first generated token comes from them) and its features f[0..P-1]."""
        self.cache = self.target.new_cache()
        self.valid = torch.zeros(len(prompts), 0, dtype=torch.bool, device=self.target.device)
        self.kpos = torch.zeros(len(prompts), 0, dtype=torch.int64, device=self.target.device)
        self.lengths = [0] * len(prompts)
        logits, aux, width = self.append(prompts, left=True, logits=True)
        feats = [aux[b, width - len(p):] for b, p in enumerate(prompts)]
        self.commit([len(p) for p in prompts], width, left=True)
        return logits[:, -1], feats

    def append(self, tokens: Sequence[Sequence[int]], left: bool = False,
               parents: Optional[Sequence[Sequence[int]]] = None, logits: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One forward appending row b's ``tokens[b]`` (right-padded, or left-padded for a
        prefill) after its committed entries. Without ``parents`` the new tokens are a sequence
        (causal); with ``parents[b]`` they are a tree (``tree.DraftTree``: ``tokens[b][0]`` the root,
        node i+1's parent ``parents[b][i]``): a node attends to its ancestors and sits at rope
        position ``committed + depth``. Returns (greedy tokens [B, S] or, with ``logits``, the
        logits [B, S, V]; features [B, S, F]; S); follow with ``commit`` / ``commit_nodes`` to say
        which entries each row keeps."""
        dev = self.target.device
        B, S = len(tokens), max(len(t) for t in tokens)
        ids = torch.zeros(B, S, dtype=torch.int64)
        new_valid = torch.zeros(B, S, dtype=torch.bool)
        pos = torch.zeros(B, S, dtype=torch.int64)
        inner = torch.ones(S, S, dtype=torch.bool).tril()[None].repeat(B, 1, 1)
        for b, t in enumerate(tokens):
            lo = S - len(t) if left else 0
            ids[b, lo:lo + len(t)] = torch.as_tensor(list(t), dtype=torch.int64)
            new_valid[b, lo:lo + len(t)] = True
            if parents is None:
                pos[b, lo:lo + len(t)] = torch.arange(self.lengths[b], self.lengths[b] + len(t))
            else:
                tree = DraftTree(list(t[1:]), list(parents[b]))
                pos[b, : len(t)] = self.lengths[b] + torch.tensor(tree.depths())
                inner[b] = ancestor_mask(tree, S)
        ids, new_valid, pos, inner = ids.to(dev), new_valid.to(dev), pos.to(dev), inner.to(dev)
        L0 = self.valid.shape[1]
        keys = torch.cat([self.valid, new_valid], dim=1)  # [B, L0 + S]
        mask = torch.cat([self.valid[:, None, :].expand(B, S, L0), inner & new_valid[:, None, :]], dim=2)
        mask[:, torch.arange(S), L0 + torch.arange(S)] = True  # every query sees itself
        kpos = torch.cat([self.kpos, pos], dim=1)
        # sliding-window layers (Gemma) mask by rope distance, so they need every entry's position
        extra = {"key_positions": kpos} if getattr(self.target, "sliding_window", 0) else {}
        out, aux = self.target.forward_rows(ids, pos, mask, self.cache, logits=logits, **extra)
        self.valid, self.kpos = keys, kpos
        return out, aux, S

    def commit(self, keep: Sequence[int], width: int, left: bool = False) -> None:
        """Row b keeps the first ``keep[b]`` of the tokens it appended last (all of a prefill's);
        the rest of the ``width`` new entries become holes."""
        L = self.valid.shape[1]
        for b, k in enumerate(keep):
            if not left:
                self.valid[b, L - width + k:] = False
            self.lengths[b] += k

    def commit_nodes(self, nodes: Sequence[Sequence[int]], width: int) -> None:
        """Row b keeps the entries ``nodes[b]`` (indices into the tokens it appended last: a tree's
        root and accepted path, in depth order); the rest of the ``width`` new entries become holes."""
        L = self.valid.shape[1]
        for b, kept in enumerate(nodes):
            live = torch.zeros(width, dtype=torch.bool, device=self.valid.device)
            live[list(kept)] = True
            self.valid[b, L - width:] &= live
            self.lengths[b] += len(kept)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (finished prompts leave the batch)."""
        if list(rows) == list(range(self.rows)):
            return
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.target.device)
        self.cache.batch_select_indices(idx)
        self.valid = self.valid.index_select(0, idx)
        self.kpos = self.kpos.index_select(0, idx)
        self.lengths = [self.lengths[r] for r in rows]
