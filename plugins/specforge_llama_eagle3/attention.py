"""Training-time-test attention: causal attention over step-0 keys plus one key per earlier step.

At TTT step k the query at position t sees

* the step-0 keys at positions s <= t (causal; padded keys hidden), and
* the key at position t of every step j = 1..k (one "diagonal" per step).

The diagonal keys are different for every query, so instead of concatenating all steps' keys and
masking a [T, T*(k+1)] matrix (what ``dense_ttt_attention`` at the end of this file does: the
definition, for tests), we run an
ordinary causal attention that also returns its log-sum-exp, score each diagonal with an
elementwise dot product, and merge the k+1 partial softmaxes exactly through their log-sum-exps.
Memory is that of plain causal attention plus O(T*k) per head.

``causal_attention_with_lse`` is the piece a fused kernel replaces (keep its signature): ``sdpa``
(PyTorch's fused kernels + two extra passes for the LSE gradient) or ``flex`` (FlexAttention, whose
backward takes the LSE gradient itself). The merge is one autograd Function: ``_DiagonalMerge``
(a loop over diagonals; CPU, eager) or ``_StackedDiagonalMerge`` (stacked diagonals, each direction
one ``torch.compile``d call on GPU).
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

    ``key_valid`` is a bool [B, T] (True on real tokens) or, for packed rows, an integer [B, T] of
    document ids (-1 on padding): then key s must also belong to query t's document.
    A query always sees its own position, so rows of padded positions stay finite (they carry no
    loss; with right padding a real query never reaches a padded key anyway)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if key_valid is None:
        return causal[None, None]
    eye = torch.eye(T, dtype=torch.bool, device=device)
    if key_valid.dtype != torch.bool:  # document ids: same document, and a real token
        docs = key_valid
        same = (docs[:, :, None] == docs[:, None, :]) & (docs[:, None, :] >= 0)
        return (causal & (same | eye))[:, None]
    return (causal & (key_valid[:, None, None, :] | eye))


def causal_attention_with_lse(
    q: torch.Tensor,  # [B, Hq, T, D] (rope applied)
    k: torch.Tensor,  # [B, Hkv, T, D]
    v: torch.Tensor,  # [B, Hkv, T, D]
    key_valid: Optional[torch.Tensor],  # bool [B, T], int document ids [B, T] (packed rows), or None
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
    if not q.dtype == k.dtype == v.dtype:
        # the raw aten kernels below do not check this (mixed dtypes read out of bounds on CUDA)
        raise TypeError(f"sdpa attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
    rows differ from the explicit version; they carry no loss). Packed rows (document ids) need a
    document mask, which these kernels cannot take: use flex (GPU) or eager."""
    if key_valid is not None and key_valid.dtype != torch.bool:
        raise ValueError("attention 'sdpa' cannot run packed rows (document masks); use 'flex' or 'eager'")
    n_rep = q.shape[1] // k.shape[1]
    return _CausalSDPAWithLSE.apply(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale)


# ------------------------------------------------------------------------------ flex (GPU)
_FLEX = {}  # compiled flex_attention and causal block masks, built once per shape

# How flex_attention is compiled. ``None`` (torch's automatic dynamic shapes): the first sequence
# length compiles a static kernel, the first *different* one recompiles once with a symbolic T and
# every later length reuses it. ``False`` compiled one kernel per length and, past torch's recompile
# limit (8), silently ran flex uncompiled: 20x slower and a dense [T, T] score matrix per head.
FLEX_DYNAMIC: Optional[bool] = None


def _flex_kernel():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=FLEX_DYNAMIC)
    return _FLEX["fn"]


def _document_block_mask(docs: torch.Tensor):
    """Block mask of causal attention inside documents for packed rows (``docs`` int [B, T], -1 on
    padding). Built per micro-batch (the documents differ); cheap next to the attention itself."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = docs.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((docs[b, q_idx] == docs[b, kv_idx]) | (q_idx == kv_idx))

    return create_block_mask(same_document_causal, B, None, T, T, device=docs.device)


def _causal_block_mask(T: int, device):
    key = (T, str(device))
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        _FLEX[key] = create_block_mask(causal, None, None, T, T, device=device)
    return _FLEX[key]


def flex_causal_attention_with_lse(q, k, v, key_valid, scale):
    """Causal attention + differentiable LSE through FlexAttention (a fused Triton kernel whose
    backward takes the LSE gradient directly: no [T, T] matrix, no extra attention passes).
    Right-padded batches, like ``sdpa_causal_attention_with_lse``. The causal block mask is built
    once per sequence length; GQA is handled by the kernel (no repeated K/V)."""
    if not q.is_cuda:  # flex's eager CPU path is a dense reference; keep CPU on the explicit one
        return causal_attention_with_lse(q, k, v, key_valid, scale)
    from torch.nn.attention.flex_attention import AuxRequest

    packed = key_valid is not None and key_valid.dtype != torch.bool
    block_mask = _document_block_mask(key_valid) if packed else _causal_block_mask(q.shape[2], q.device)
    out, aux = _flex_kernel()(q, k, v, block_mask=block_mask, scale=scale,
                              enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True))
    return out, aux.lse.float()


CAUSAL_IMPLS = {"eager": causal_attention_with_lse, "sdpa": sdpa_causal_attention_with_lse,
                "flex": flex_causal_attention_with_lse}


class _DiagonalMerge(torch.autograd.Function):
    """out = w_0 * causal_out + sum_j w_j * v_j with w = softmax([lse, s_1..s_k]), s_j = scale <q, k_j>.

    One Function instead of autograd over stacked/repeated tensors: GQA is a broadcast view (no
    repeat_interleave copies), softmax math is fp32, and backward keeps only the inputs plus the
    [B, Hq, T, k+1] weights."""

    @staticmethod
    def forward(ctx, scale, q, out, lse, *kv):
        k_diag, v_diag = kv[: len(kv) // 2], kv[len(kv) // 2 :]
        B, Hq, T, D = q.shape
        Hkv = k_diag[0].shape[1]
        qg = q.view(B, Hkv, Hq // Hkv, T, D)
        f32 = torch.promote_types(q.dtype, torch.float32)
        qf = qg.to(f32)
        scores = [torch.einsum("bgrtd,bgtd->bgrt", qf, kj.to(f32)).reshape(B, Hq, T) * scale for kj in k_diag]
        w = torch.softmax(torch.stack([lse.to(f32), *scores], dim=-1), dim=-1)  # [B, Hq, T, k+1]
        res = out.to(f32) * w[..., :1]
        resg = res.view(B, Hkv, Hq // Hkv, T, D)
        for j, vj in enumerate(v_diag, start=1):
            resg += w[..., j].view(B, Hkv, Hq // Hkv, T, 1) * vj.to(f32)[:, :, None]
        ctx.save_for_backward(q, out, w, *kv)
        ctx.scale = scale
        return res.to(out.dtype)

    @staticmethod
    def backward(ctx, d_res):
        q, out, w, *kv = ctx.saved_tensors
        k_diag, v_diag = kv[: len(kv) // 2], kv[len(kv) // 2 :]
        B, Hq, T, D = q.shape
        Hkv, rep = k_diag[0].shape[1], Hq // k_diag[0].shape[1]
        f32 = w.dtype
        g = d_res.to(f32)
        gg = g.view(B, Hkv, rep, T, D)
        d_out = (g * w[..., :1]).to(out.dtype)
        # d w_0 = <g, out>, d w_j = <g, v_j>; then through the softmax over the k+1 parts
        dw = [(g * out.to(f32)).sum(-1)]
        dw += [torch.einsum("bgrtd,bgtd->bgrt", gg, vj.to(f32)).reshape(B, Hq, T) for vj in v_diag]
        dw = torch.stack(dw, dim=-1)
        dp = w * (dw - (w * dw).sum(-1, keepdim=True))  # [B, Hq, T, k+1]
        d_lse = dp[..., 0]
        qf = q.to(f32).view(B, Hkv, rep, T, D)
        d_q = torch.zeros_like(qf)
        d_k, d_v = [], []
        for j, (kj, vj) in enumerate(zip(k_diag, v_diag, strict=True), start=1):
            dpj = (dp[..., j] * ctx.scale).view(B, Hkv, rep, T, 1)
            d_q += dpj * kj.to(f32)[:, :, None]
            d_k.append((dpj * qf).sum(2).to(kj.dtype))
            d_v.append((w[..., j].view(B, Hkv, rep, T, 1) * gg).sum(2).to(vj.dtype))
        return None, d_q.view(B, Hq, T, D).to(q.dtype), d_out, d_lse, *d_k, *d_v


# ------------------------------------------------------------------- compiled diagonal merge (GPU)
# The same math as ``_DiagonalMerge`` written over *stacked* diagonals [n, B, Hkv, T, D] with
# broadcasts instead of a Python loop, so that ``torch.compile`` turns each direction into a couple
# of fused reduction kernels (bf16 in, fp32 arithmetic in registers, bf16/fp32 out) instead of
# ~10 eager fp32 passes over [T, Hq, D] per diagonal. Stacking copies the n diagonals once per step
# (n x [T, Hkv*D] bf16: small next to the passes it saves).


def merge_forward(q, out, lse, ks, vs, scale: float):
    """-> (merged [B, Hq, T, D] in out's dtype, softmax weights w [n+1, B, Hq, T] fp32)."""
    n, B, Hkv, T, D = ks.shape
    Hq = q.shape[1]
    rep = Hq // Hkv
    f32 = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(f32).reshape(B, Hkv, rep, T, D)
    s = (qf[None] * ks.to(f32)[:, :, :, None]).sum(-1).reshape(n, B, Hq, T) * scale
    w = torch.softmax(torch.cat([lse.to(f32)[None], s]), dim=0)
    wj = w[1:].reshape(n, B, Hkv, rep, T, 1)
    res = out.to(f32) * w[0, ..., None] + (wj * vs.to(f32)[:, :, :, None]).sum(0).reshape(B, Hq, T, D)
    return res.to(out.dtype), w


def merge_backward(d_res, q, out, w, ks, vs, scale: float):
    """Gradients of ``merge_forward`` -> (d_q, d_out, d_lse, d_ks, d_vs)."""
    n, B, Hkv, T, D = ks.shape
    Hq = q.shape[1]
    rep = Hq // Hkv
    f32 = w.dtype
    g = d_res.to(f32)
    gg = g.reshape(B, Hkv, rep, T, D)
    d_out = (g * w[0, ..., None]).to(out.dtype)
    dw0 = (g * out.to(f32)).sum(-1)
    dwj = (gg[None] * vs.to(f32)[:, :, :, None]).sum(-1).reshape(n, B, Hq, T)
    dw = torch.cat([dw0[None], dwj])
    dp = w * (dw - (w * dw).sum(0, keepdim=True))  # softmax backward over the n+1 parts
    dpj = (dp[1:] * scale).reshape(n, B, Hkv, rep, T, 1)
    qf = q.to(f32).reshape(B, Hkv, rep, T, D)
    d_q = (dpj * ks.to(f32)[:, :, :, None]).sum(0).reshape(B, Hq, T, D)
    d_ks = (dpj * qf[None]).sum(3)
    d_vs = (w[1:].reshape(n, B, Hkv, rep, T, 1) * gg[None]).sum(3)
    return d_q.to(q.dtype), d_out, dp[0], d_ks.to(ks.dtype), d_vs.to(vs.dtype)


_MERGE: dict = {}


def _merge_fn(name: str, compiled: bool):
    fn = {"forward": merge_forward, "backward": merge_backward}[name]
    if not compiled:
        return fn
    if name not in _MERGE:
        # dynamic=None: the diagonal count n and T become symbolic after their first change, so a
        # handful of compiles cover every step and sequence length
        _MERGE[name] = torch.compile(fn)
    return _MERGE[name]


class _StackedDiagonalMerge(torch.autograd.Function):
    """``_DiagonalMerge`` over stacked diagonals, forward and backward each one compiled call."""

    @staticmethod
    def forward(ctx, scale, compiled, q, out, lse, ks, vs):
        res, w = _merge_fn("forward", compiled)(q, out, lse, ks, vs, scale)
        ctx.save_for_backward(q, out, w, ks, vs)
        ctx.scale, ctx.compiled = scale, compiled
        return res

    @staticmethod
    def backward(ctx, d_res):
        q, out, w, ks, vs = ctx.saved_tensors
        d_q, d_out, d_lse, d_ks, d_vs = _merge_fn("backward", ctx.compiled)(d_res, q, out, w, ks, vs, ctx.scale)
        return None, None, d_q, d_out, d_lse, d_ks, d_vs


def ttt_attention(
    q: torch.Tensor,  # [B, Hq, T, D]: this step's queries (rope at position t+k)
    k0: torch.Tensor,  # [B, Hkv, T, D]: step-0 keys (rope at position s)
    v0: torch.Tensor,  # [B, Hkv, T, D]
    k_diag: Sequence[torch.Tensor],  # steps 1..k: [B, Hkv, T, D] each (rope at t+j)
    v_diag: Sequence[torch.Tensor],
    key_valid: Optional[torch.Tensor],  # bool [B, T] or int document ids [B, T] (packed rows)
    scale: float,
    causal=causal_attention_with_lse,  # or sdpa_/flex_causal_attention_with_lse
    merge: str = "loop",  # "loop" (_DiagonalMerge), "stacked" (eager), "compiled" (stacked + torch.compile)
) -> torch.Tensor:
    """Attention output [B, Hq, T, D] of TTT step k = len(k_diag)."""
    out, lse = causal(q, k0, v0, key_valid, scale)
    if not k_diag:
        return out
    # Each diagonal is a single key per query: its "log-sum-exp" is just its score.
    if merge == "loop":
        return _DiagonalMerge.apply(scale, q, out, lse, *k_diag, *v_diag)
    if merge not in ("stacked", "compiled"):
        raise ValueError(f"merge '{merge}' is not known; allowed: loop, stacked, compiled")
    return _StackedDiagonalMerge.apply(scale, merge == "compiled", q, out, lse, torch.stack(list(k_diag)),
                                       torch.stack(list(v_diag)))


# ------------------------------------------------------------------ the definition (tests only)
def ttt_mask(T: int, k: int, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B or 1, T, T*(k+1)]: all steps' keys side by side, column j*T + s = step j's key at
    position s; True where query t of step k may see it (memory O(T * T*(k+1)))."""
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    blocks = [(s <= t)[None]]  # step 0: causal
    if key_valid is not None:
        blocks[0] = blocks[0] & (key_valid[:, None, :] | (s == t))
    blocks += [(s == t)[None].expand_as(blocks[0]) for _ in range(k)]  # steps 1..k: the diagonal
    return torch.cat(blocks, dim=-1)


def dense_ttt_attention(q, k0, v0, k_diag, v_diag, key_valid, scale) -> torch.Tensor:
    """Same contract as ``ttt_attention``, computed the obvious way (one dense masked softmax)."""
    n_rep = q.shape[1] // k0.shape[1]
    keys = repeat_kv(torch.cat([k0, *k_diag], dim=2), n_rep)  # [B, Hq, T*(k+1), D]
    vals = repeat_kv(torch.cat([v0, *v_diag], dim=2), n_rep)
    mask = ttt_mask(q.shape[2], len(k_diag), key_valid)[:, None]
    scores = (q @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs @ vals
