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


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out, lse) of causal attention from PyTorch's fused kernels (no [T, T] matrix kept)."""
    if q.is_cuda:
        # The memory-efficient kernel returns the LSE on every CUDA arch and dtype we train in.
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, is_causal=True,
                                                                      scale=scale)
        return res[0], res[1][..., : q.shape[2]]
    res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return res[0], res[1]


class _CausalSDPAWithLSE(torch.autograd.Function):
    """Causal attention returning a *differentiable* LSE, on top of fused SDPA kernels.

    d lse_t / d q_t = scale * sum_s p_ts k_s  = scale * attention(q, k, values=k)
    d lse_t / d k_s = scale * p_ts q_t        -> the value-gradient of attention(q, k, .)
    so the backward is two more SDPA calls; nothing of size [T, T] is stored."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _sdpa_lse(q, k, v, scale)
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return out, lse.to(torch.float32)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            k_as_value = k.detach().requires_grad_()
            out = sdpa(q_, k_, v_, is_causal=True, scale=scale)
            pk = sdpa(q.detach(), k.detach(), k_as_value, is_causal=True, scale=scale)  # P @ K
            g_lse = (scale * d_lse[..., None]).to(q.dtype)
            dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), d_out if d_out is not None else torch.zeros_like(out))
            (dk_lse,) = torch.autograd.grad(pk, (k_as_value,), g_lse * q)
        return dq + g_lse * pk.detach(), dk + dk_lse, dv, None


def sdpa_causal_attention_with_lse(q, k, v, key_valid, scale):
    """Same contract as ``causal_attention_with_lse`` for *right-padded* batches: real queries can
    never reach a padded key under the causal mask, so ``key_valid`` is not needed (padded query
    rows differ from the explicit version; they carry no loss)."""
    n_rep = q.shape[1] // k.shape[1]
    return _CausalSDPAWithLSE.apply(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale)


CAUSAL_IMPLS = {"eager": causal_attention_with_lse, "sdpa": sdpa_causal_attention_with_lse}


def ttt_attention(
    q: torch.Tensor,  # [B, Hq, T, D]: this step's queries (rope at position t+k)
    k0: torch.Tensor,  # [B, Hkv, T, D]: step-0 keys (rope at position s)
    v0: torch.Tensor,  # [B, Hkv, T, D]
    k_diag: Sequence[torch.Tensor],  # steps 1..k: [B, Hkv, T, D] each (rope at t+j)
    v_diag: Sequence[torch.Tensor],
    key_valid: Optional[torch.Tensor],  # bool [B, T]
    scale: float,
    causal=causal_attention_with_lse,  # or sdpa_causal_attention_with_lse / a fused kernel
) -> torch.Tensor:
    """Attention output [B, Hq, T, D] of TTT step k = len(k_diag)."""
    out, lse = causal(q, k0, v0, key_valid, scale)
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
