"""The EAGLE-3 draft training step written the plain way: the yardstick for ``draft_step.py``.

Per TTT step k: the decoder layer written out in plain torch from the draft's weights; lay all
steps' keys side by side, build the dense [T, T*(k+1)] boolean mask,
softmax the full fp32 score matrix, then the full [tokens, draft_vocab] logits of draft and target
and a soft cross-entropy with ``log_softmax``. Same weights and same alignment as the trainer
(``align_step``), no fused kernels, no chunking. Memory grows as T^2 * k, so it fits only short
sequences (on an 80 GB H100: 2048 tokens).

    python benchmarks/draft_step.py --T 1024 --variants eager-ref   # time and memory on the GPU

(A leaf module: ``draft_step`` imports it, it imports no benchmark.)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from specforge_llama_eagle3.attention import repeat_kv, ttt_mask  # noqa: E402
from specforge_llama_eagle3.model import _shift_left, apply_rope, cos_sin  # noqa: E402
from specforge_llama_eagle3.objective import align_step  # noqa: E402


def _rms(x, w, eps):
    xf = x.float()  # Llama: normalise in fp32, scale in x's dtype
    return w.to(x.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def eager_step_loss(model, batch, target_head, t2d, K: int, decay: float = 0.8):
    """Summed step-weighted loss of one micro-batch (what the trainer backpropagates), plus the
    per-step raw losses. ``model`` is a ``LlamaEagle3Draft``; only its weights, its fc input
    (EAGLE-3.1 fc_norm) and the rope helpers are used: the layer is written out here."""
    L, attn, eps = model.midlayer, model.midlayer.self_attn, model.config.rms_norm_eps
    B, T = batch.input_ids.shape
    hidden = model.fc(model.fc_input(batch.aux_hidden))
    pos = torch.arange(T, device=hidden.device)
    acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax math in fp32 (fp64 stays fp64)
    keys, vals, total, raws = [], [], 0.0, []

    def heads(x, lin, n):
        return F.linear(x, lin.weight).view(B, T, n, attn.head_dim).transpose(1, 2)

    for k in range(K):
        emb = model.embed_tokens(_shift_left(batch.input_ids, k + 1)).to(hidden.dtype)
        x = torch.cat([_rms(emb, L.input_layernorm.weight, eps), _rms(hidden, L.hidden_norm.weight, eps)], -1)
        cos, sin = cos_sin(model.inv_freq, pos + k, x.dtype)
        q = apply_rope(heads(x, attn.q_proj, attn.n_heads), cos, sin)
        keys.append(apply_rope(heads(x, attn.k_proj, attn.n_kv), cos, sin))
        vals.append(heads(x, attn.v_proj, attn.n_kv))
        n_rep = attn.n_heads // attn.n_kv
        K_all = repeat_kv(torch.cat(keys, dim=2), n_rep).to(acc)  # [B, Hq, T*(k+1), D]
        V_all = repeat_kv(torch.cat(vals, dim=2), n_rep).to(acc)
        mask = ttt_mask(T, k, batch.attention_mask.bool().cpu()).to(q.device)[:, None]
        scores = (q.to(acc) @ K_all.transpose(-1, -2)) * attn.scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = (probs @ V_all).to(q.dtype).transpose(1, 2).reshape(B, T, -1)
        h = hidden + F.linear(out, attn.o_proj.weight)
        u = _rms(h, L.post_attention_layernorm.weight, eps)
        h = h + F.linear(F.silu(F.linear(u, L.mlp.gate_proj.weight)) * F.linear(u, L.mlp.up_proj.weight),
                         L.mlp.down_proj.weight)
        normed = _rms(h, model.norm.weight, eps)
        hidden = normed if model.config.norm_output else h  # EAGLE-3.1 norm_output: the normed output

        target_hidden, valid = align_step(batch, k, t2d)
        d = model.lm_head(normed).to(acc)  # [B, T, Vd]
        t = (target_hidden @ target_head.T).to(acc)
        ce = -(torch.softmax(t, -1) * torch.log_softmax(d, -1)).sum(-1)  # [B, T]
        n = valid.sum().clamp(min=1)
        raw = (ce * valid).sum() / n
        raws.append(raw.detach())
        total = total + decay**k * raw
    return total, torch.stack(raws)

