"""Training-time-test attention: causal attention over step-0 keys plus one key per earlier step.

At TTT step k the query at position t sees

* the step-0 keys at positions s <= t (causal; padded keys hidden), and
* the key at position t of every step j = 1..k (one "diagonal" per step).

The diagonal keys are different for every query, so instead of concatenating all steps' keys and
masking a [T, T*(k+1)] matrix (what ``reference.dense_ttt_attention`` does, for tests), we run an
ordinary causal attention that also returns its log-sum-exp, score each diagonal with an
elementwise dot product, and merge the k+1 partial softmaxes exactly through their log-sum-exps.
Memory is that of plain causal attention plus O(T*k) per head.

``causal_attention_with_lse`` is the piece a fused kernel (flash / flex with LSE) replaces; keep
its signature.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv*n_rep, T, D] (GQA: each kv head serves n_rep query heads)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Softmax arithmetic in at least fp32 (bf16 scores lose the tail of the distribution)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def causal_key_mask(key_valid: Optional[torch.Tensor], T: int, device) -> torch.Tensor:
    """bool [B or 1, 1, T, T]: query t may see key s iff s <= t and key s is a real token.

    A query always sees its own position, so rows of padded positions stay finite (they carry no
    loss; with right padding a real query never reaches a padded key anyway)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if key_valid is None:
        return causal[None, None]
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & (key_valid[:, None, None, :] | eye))


def causal_attention_with_lse(
    q: torch.Tensor,  # [B, Hq, T, D] (rope applied)
    k: torch.Tensor,  # [B, Hkv, T, D]
    v: torch.Tensor,  # [B, Hkv, T, D]
    key_valid: Optional[torch.Tensor],  # bool [B, T] or None
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal, padding-aware attention. Returns (out [B, Hq, T, D], lse [B, Hq, T]), both
    differentiable. Explicit [T, T] scores: fine on CPU and as the always-correct fallback."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = _acc(q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~causal_key_mask(key_valid, q.shape[2], q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(v.dtype)
    return probs @ v, lse


def ttt_attention(
    q: torch.Tensor,  # [B, Hq, T, D]: this step's queries (rope at position t+k)
    k0: torch.Tensor,  # [B, Hkv, T, D]: step-0 keys (rope at position s)
    v0: torch.Tensor,  # [B, Hkv, T, D]
    k_diag: Sequence[torch.Tensor],  # steps 1..k: [B, Hkv, T, D] each (rope at t+j)
    v_diag: Sequence[torch.Tensor],
    key_valid: Optional[torch.Tensor],  # bool [B, T]
    scale: float,
) -> torch.Tensor:
    """Attention output [B, Hq, T, D] of TTT step k = len(k_diag)."""
    out, lse = causal_attention_with_lse(q, k0, v0, key_valid, scale)
    if not k_diag:
        return out
    n_rep = q.shape[1] // k0.shape[1]
    # Each diagonal is a single key per query: its "log-sum-exp" is just its score.
    diag_scores = [_acc((q * repeat_kv(kj, n_rep)).sum(-1)) * scale for kj in k_diag]
    parts = torch.stack([lse, *diag_scores], dim=-1)  # [B, Hq, T, k+1]
    weights = torch.softmax(parts, dim=-1).to(out.dtype)  # share of each part in the full softmax
    out = out * weights[..., :1]
    for j, vj in enumerate(v_diag, start=1):
        out = out + weights[..., j : j + 1] * repeat_kv(vj, n_rep)
    return out
