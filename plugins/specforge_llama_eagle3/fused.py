"""The decoder layer's two fused blocks (norm+concat, residual+norm+MLP), q/k/v and the norm as
pure functions of (activations, compute-dtype weights), and ``Cast``: the one place weights meet
the compute dtype.

A ``Cast`` casts each weight to the compute dtype *once per micro-step* (a no-op for bf16 params;
for fp32 master weights this is the bf16 parameter copy FSDP2's MixedPrecisionPolicy makes), so
the 7 TTT steps share one copy and their weight gradients accumulate into it before a single cast
back, as autocast's weight cache does. The functions below run with autocast off: their dtypes
are explicit.

On CUDA they run ``torch.compile``d: the fp32 RMSNorms, rope, SwiGLU and residual adds fuse
into a few kernels around the GEMMs (eager: ~6 passes over [T, H] fp32 per norm). q/k/v are one
GEMM over the concatenated weight (the input is read once, backward is one dX GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specforge_llama_eagle3.rope import apply_rope


class Cast:
    """Weights in ``dtype``, each cast once for this object's life (one micro-step or one call)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._done: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, *weights: torch.Tensor) -> torch.Tensor:
        """One weight cast, or several concatenated along dim 0 (q/k/v: one GEMM)."""
        key = tuple(id(w) for w in weights)
        if key not in self._done:
            cast = [w.to(self.dtype) for w in weights]
            self._done[key] = cast[0] if len(cast) == 1 else torch.cat(cast)
        return self._done[key]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w.to(x.dtype) * xf.to(x.dtype)


def attn_input(emb, hidden, w_in, w_hid, eps: float) -> torch.Tensor:
    """cat(input_layernorm(emb), hidden_norm(hidden)) -> [B, T, 2H]."""
    return torch.cat([rms_norm(emb.to(hidden.dtype), w_in, eps), rms_norm(hidden, w_hid, eps)], dim=-1)


def qkv(x, w_qkv, cos, sin, n_heads: int, n_kv: int, head_dim: int):
    """One GEMM for q, k, v; rope on q and k. -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
    B, T, _ = x.shape
    y = F.linear(x, w_qkv).view(B, T, n_heads + 2 * n_kv, head_dim).transpose(1, 2)
    q, k, v = y.split([n_heads, n_kv, n_kv], dim=1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def finish(hidden, attn, w_o, w_post, eps: float, w_gate, w_up, w_down) -> torch.Tensor:
    """Residual + o_proj, then post-attention norm + SwiGLU MLP + residual (un-normed output)."""
    B, _, T, _ = attn.shape
    h = hidden + F.linear(attn.transpose(1, 2).reshape(B, T, -1), w_o)
    x = rms_norm(h, w_post, eps)
    return h + F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


FUNCS = {"attn_input": attn_input, "qkv": qkv, "finish": finish, "rms_norm": rms_norm}
_COMPILED: dict = {}


def get(name: str, compiled: bool):
    """The plain or the compiled version of FUNCS[name] (compiled once per process; dynamic=None:
    the first new sequence length recompiles with a symbolic T, later ones reuse it)."""
    if not compiled:
        return FUNCS[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(FUNCS[name])
    return _COMPILED[name]
