"""The DFlash draft: a small Qwen3-style decoder that denoises a *block* of masked tokens in one
forward, conditioned on the target's hidden states (z-lab's DFlash, "block diffusion" drafting).

Inputs of one block anchored at committed position n (x[n] = the last committed token):

    query tokens   [x[n], MASK, MASK, ..., MASK]          (block_size tokens, positions n..n+B-1)
    context        ctx[p] = hidden_norm(fc(f[p])), p < n  (f[p]: the target's aux hidden states
                                                           at position p, concatenated)

Every layer attends from the block's queries to keys/values made from the context (projected by
that layer's k_proj/v_proj, keys normed and roped at their own positions) and from the block itself,
*bidirectionally* inside the block. The output at block slot j >= 1 predicts x[n+j]: B-1 draft
tokens per forward. Parameter names are the ones vLLM's ``DFlashDraftModel`` loader reads
(``vllm/model_executor/models/qwen3_dflash.py``), so the state dict is the export.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn


@attrs.define
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    num_aux: int  # target layers concatenated into each context feature
    block_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding of ``x`` [..., S, D] at integer positions ``pos`` [..., S]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[..., None] * inv  # [..., S, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def block_attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_blk: torch.Tensor,
                    v_blk: torch.Tensor, ctx_visible: torch.Tensor, scale: float,
                    block_len: torch.Tensor | None = None) -> torch.Tensor:
    """One softmax over [context keys visible to the block, all keys of the block].

    q, k_blk, v_blk: [B, A, h, S, D] (A blocks per row, S slots each; kv heads already repeated);
    k_ctx, v_ctx: [B, h, C, D]; ctx_visible: bool [B, A, C]; block_len: optional int [B, A]: only
    the block's first block_len slots are keys (a shorter block inside the padded one: what a
    block of that many slots computes for them). Returns [B, A, h, S, D].
    Scores against the context and against the block are concatenated, so no [A*S, A*S] mask
    across blocks is ever built."""
    s_ctx = torch.einsum("bahsd,bhcd->bahsc", q, k_ctx).float() * scale
    s_ctx = s_ctx.masked_fill(~ctx_visible[:, :, None, None, :], float("-inf"))
    s_blk = torch.einsum("bahsd,bahtd->bahst", q, k_blk).float() * scale
    if block_len is not None:
        slot = torch.arange(k_blk.shape[-2], device=k_blk.device)
        s_blk = s_blk.masked_fill((slot >= block_len[..., None])[:, :, None, None, :], float("-inf"))
    p = torch.softmax(torch.cat([s_ctx, s_blk], dim=-1), dim=-1).to(q.dtype)
    C = k_ctx.shape[2]
    return (torch.einsum("bahsc,bhcd->bahsd", p[..., :C], v_ctx)
            + torch.einsum("bahst,bahtd->bahsd", p[..., C:], v_blk))


class Attention(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.h, self.kv, self.d, self.theta = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta
        self.q_proj = nn.Linear(c.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, c.rms_norm_eps)  # per head (Qwen3)
        self.k_norm = RMSNorm(self.d, c.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # [..., S, n*D] -> [..., n, S, D]
        return x.unflatten(-1, (n, self.d)).transpose(-2, -3)

    def kv_of(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped, normed keys and values of ``x`` [..., S, H] at ``pos`` [..., S], heads repeated."""
        k = rope(self.k_norm(self._heads(self.k_proj(x), self.kv)), pos.unsqueeze(-2), self.theta)
        v = self._heads(self.v_proj(x), self.kv)
        rep = self.h // self.kv
        return k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ctx: torch.Tensor, ctx_pos: torch.Tensor,
                ctx_visible: torch.Tensor, block_len: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, A, S, H] at pos [B, A, S]; ctx [B, C, H] (already hidden_norm'ed) at ctx_pos [B, C]."""
        q = rope(self.q_norm(self._heads(self.q_proj(x), self.h)), pos.unsqueeze(-2), self.theta)
        k_blk, v_blk = self.kv_of(x, pos)
        k_ctx, v_ctx = self.kv_of(ctx, ctx_pos)
        out = block_attention(q, k_ctx, v_ctx, k_blk, v_blk, ctx_visible, 1.0 / math.sqrt(self.d), block_len)
        return self.o_proj(out.transpose(-2, -3).flatten(-2))


class MLP(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, pos, ctx, ctx_pos, ctx_visible, block_len=None):
        x = x + self.self_attn(self.input_layernorm(x), pos, ctx, ctx_pos, ctx_visible, block_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraft(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen (mask token included)
        self.fc = nn.Linear(c.num_aux * c.target_hidden_size, c.hidden_size, bias=False)  # W_proj
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)

    def context(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[..., num_aux*Ht] target features -> [..., H] context states (shared by every layer)."""
        return self.hidden_norm(self.fc(aux_hidden.to(self.fc.weight.dtype)))

    def block_ids(self, anchor_tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[...] anchor tokens -> [..., length] query ids (default block_size): the anchor, then mask
        tokens. Serving runs 1 + K slots for K draft tokens, not always the whole block."""
        ids = torch.full((*anchor_tokens.shape, length or self.config.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=anchor_tokens.device)
        ids[..., 0] = anchor_tokens
        return ids

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, ctx: torch.Tensor, ctx_pos: torch.Tensor,
                ctx_visible: torch.Tensor, block_len: torch.Tensor | None = None) -> torch.Tensor:
        """ids/pos [B, A, S] (A blocks per row), ctx [B, C, H] from ``context``, ctx_pos [B, C],
        ctx_visible bool [B, A, C], block_len optional int [B, A] (slots of each block that exist;
        default all S) -> normed hidden [B, A, S, H] (``lm_head`` gives the logits)."""
        x = self.embed_tokens(ids).to(self.fc.weight.dtype)
        for layer in self.layers:
            x = layer(x, pos, ctx, ctx_pos, ctx_visible, block_len)
        return self.norm(x)
