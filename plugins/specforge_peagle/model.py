"""The P-EAGLE draft: an EAGLE-3 layer stack that proposes all K draft tokens in ONE forward.

Each input *element* is a (token, feature) pair at a rope position:

    context entry p    (x[p+1], f[p])            at position p   (f[p]: the target's aux hidden
                                                                   states at p, concatenated)
    masked slot d>=1   (mask_token, mask_hidden) at position a+d (a: the anchor, the last entry)

``fc`` projects a feature to the draft width; ``mask_hidden`` is a learned feature vector (fc input
width) standing in for the target state the draft does not have yet. Layer 0 is EAGLE-3's:
attention over cat(input_layernorm(embedding), hidden_norm(fc output)) with the fc output as the
residual; layers 1.. are plain Llama decoder layers. The output at the anchor predicts the next
token (draft 1), the output of slot d predicts draft d+1.

Attention is given as a boolean mask over the elements of a row (``attend``), so the same forward
serves training (many anchors' slots at once, ``objective.py``) and drafting (one anchor, causal
order, ``proposer.py``). Parameter names are the ones vLLM's ``Eagle3LlamaForCausalLM`` loads
(``vllm/model_executor/models/llama_eagle3.py``), so the state dict is the export.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn


@attrs.define
class PEagleConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    num_aux: int  # target layers concatenated into each feature
    num_depths: int  # draft tokens trained per anchor (K: 1 + masked slots)
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
    """Neox-style rotary embedding (vLLM's Llama) of ``x`` [B, h, N, D] at positions ``pos`` [B, N]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None, :, None] * inv  # [B, 1, N, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: PEagleConfig, in_features: int):
        super().__init__()
        self.h, self.kv, self.d, self.theta = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta
        self.q_proj = nn.Linear(in_features, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(in_features, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(in_features, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """x [B, N, in], pos [B, N], attend bool [B, N, N] (query, key) -> [B, N, H]."""
        B, N, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(B, N, n, self.d).transpose(1, 2)

        q = rope(heads(self.q_proj(x), self.h), pos, self.theta)
        k = rope(heads(self.k_proj(x), self.kv), pos, self.theta)
        v = heads(self.v_proj(x), self.kv)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, c: PEagleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Layer 0 (``first``): EAGLE-3's, q/k/v over [embedding, feature] (2H), residual = the feature.
    Later layers: a Llama decoder layer over the residual stream."""

    def __init__(self, c: PEagleConfig, first: bool):
        super().__init__()
        self.first = first
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, 2 * c.hidden_size if first else c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        if self.first:
            inp = torch.cat([self.input_layernorm(emb), self.hidden_norm(x)], dim=-1)
        else:
            inp = self.input_layernorm(x)
        x = x + self.self_attn(inp, pos, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class PEagleDraft(nn.Module):
    def __init__(self, c: PEagleConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.num_aux * c.target_hidden_size, c.hidden_size, bias=False)
        # the feature of every masked slot (fc input width, as vLLM's buffer); small init so the
        # masked slots start near the mean target state rather than far outside it
        self.mask_hidden = nn.Parameter(torch.randn(1, c.num_aux * c.target_hidden_size) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(c, i == 0) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, features: torch.Tensor, is_mask: torch.Tensor, pos: torch.Tensor,
                attend: torch.Tensor) -> torch.Tensor:
        """ids [B, N] (the mask token on masked slots), features [B, N, num_aux*Ht] (read only where
        not ``is_mask``), is_mask bool [B, N], pos [B, N], attend bool [B, N, N] -> normed [B, N, H]."""
        w = self.fc.weight
        h = self.fc(features.to(w.dtype))
        h = torch.where(is_mask[..., None], self.fc(self.mask_hidden.to(w.dtype)), h)
        emb = self.embed_tokens(ids).to(w.dtype)
        for layer in self.layers:
            h = layer(h, emb, pos, attend)
        return self.norm(h)
