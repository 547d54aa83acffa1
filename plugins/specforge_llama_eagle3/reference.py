"""The plain, dense definition of TTT attention, for tests only (memory O(T * T*(k+1))).

All steps' keys are laid side by side, key column (j, s) = step j's key at position s, and one
explicit boolean mask says which of them query t of step k may see.
"""

from __future__ import annotations

from typing import Optional

import torch

from specforge_llama_eagle3.attention import repeat_kv


def ttt_mask(T: int, k: int, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B or 1, T, T*(k+1)]: column j*T + s is step j's key at position s."""
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    blocks = [(s <= t)[None]]  # step 0: causal
    if key_valid is not None:
        blocks[0] = blocks[0] & (key_valid[:, None, :] | (s == t))
    blocks += [(s == t)[None].expand_as(blocks[0]) for _ in range(k)]  # steps 1..k: the diagonal
    return torch.cat(blocks, dim=-1)


def dense_ttt_attention(q, k0, v0, k_diag, v_diag, key_valid, scale) -> torch.Tensor:
    """Same contract as ``attention.ttt_attention``, computed the obvious way."""
    n_rep = q.shape[1] // k0.shape[1]
    keys = repeat_kv(torch.cat([k0, *k_diag], dim=2), n_rep)  # [B, Hq, T*(k+1), D]
    vals = repeat_kv(torch.cat([v0, *v_diag], dim=2), n_rep)
    mask = ttt_mask(q.shape[2], len(k_diag), key_valid)[:, None]
    scores = (q @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs @ vals
