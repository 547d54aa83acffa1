"""llama-eagle3 model file: the one layer forward against the paper's equations written out with
plain torch ops, and the one-cast-per-micro-step rule (ComputeWeights) against a bf16 parameter copy."""

import torch
import torch.nn.functional as F
from specforge_llama_eagle3.model import ComputeWeights, DraftCache, apply_rope, cos_sin
from test_llama_eagle3_model import _batch, _draft


def _rms(x, w, eps):
    xf = x.float()  # Llama normalises in fp32 (also for fp64 inputs), then scales in x's dtype
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _paper_step(m, ids, g, pos):
    """EAGLE-3 draft step, equation by equation, no model methods but rope and the weights:
    x = [RMSNorm(e); RMSNorm(g)], causal GQA attention, residual from g, SwiGLU MLP, final norm."""
    L, a, eps = m.midlayer, m.midlayer.self_attn, m.config.rms_norm_eps
    B, T = ids.shape
    x = torch.cat([_rms(m.embed_tokens.weight[ids], L.input_layernorm.weight, eps),
                   _rms(g, L.hidden_norm.weight, eps)], dim=-1)
    heads = lambda w, n: (x @ w.T).view(B, T, n, a.head_dim).transpose(1, 2)  # noqa: E731
    cos, sin = cos_sin(m.inv_freq, pos, x.dtype)
    q = apply_rope(heads(a.q_proj.weight, a.n_heads), cos, sin)
    k = apply_rope(heads(a.k_proj.weight, a.n_kv), cos, sin).repeat_interleave(a.n_heads // a.n_kv, dim=1)
    v = heads(a.v_proj.weight, a.n_kv).repeat_interleave(a.n_heads // a.n_kv, dim=1)
    s = (q @ k.transpose(-1, -2)) * a.head_dim ** -0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    h = g + o @ a.o_proj.weight.T
    u = _rms(h, L.post_attention_layernorm.weight, eps)
    h = h + (F.silu(u @ L.mlp.gate_proj.weight.T) * (u @ L.mlp.up_proj.weight.T)) @ L.mlp.down_proj.weight.T
    return _rms(h, m.norm.weight, eps), h


def test_one_forward_equals_the_paper_equations_in_training_and_inference():
    m = _draft()
    ids, aux = _batch(B=2, T=9)
    g = aux @ m.fc.weight.T  # g = fc([l; m; h])
    want_normed, want_h = _paper_step(m, torch.roll(ids, -1, dims=1), g, torch.arange(9))
    with torch.no_grad():
        ttt0 = next(m.ttt_forward(ids, aux, torch.ones(2, 9, dtype=torch.bool), 1))
        normed, out_h = m.forward_cached(torch.roll(ids, -1, dims=1), m.fuse(aux), torch.arange(9), DraftCache())
    # TTT step 0 reads x_{t+1}; its last position reads padding, which only that position sees
    torch.testing.assert_close(ttt0[:, :-1], want_normed[:, :-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normed, want_normed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_h, want_h, rtol=1e-12, atol=1e-12)


def test_cast_copies_each_weight_once():
    w1, w2 = torch.randn(4, 3), torch.randn(2, 3)
    cast = ComputeWeights(torch.bfloat16)
    assert cast(w1) is cast(w1) and cast(w1, w2) is cast(w1, w2)
    assert torch.equal(cast(w1, w2), torch.cat([w1, w2]).bfloat16())
    same = ComputeWeights(torch.float32)
    assert same(w1) is w1  # no copy when the weight already has the compute dtype


def test_fp32_master_under_autocast_equals_a_bf16_parameter_copy():
    """One bf16 copy per micro-step shared by the TTT steps (what FSDP2's mixed precision does):
    the fp32 master's gradients are exactly the bf16 copy's gradients, cast up once."""
    ids, aux = _batch(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    master = _draft().float().train()
    copy = _draft().float().to(torch.bfloat16).train()
    copy.inv_freq = master.inv_freq  # .to(bf16) rounds the rope buffer too; keep the same rope

    def loss_of(outs):
        return sum((o.float() ** 2).mean() * (i + 1) for i, o in enumerate(outs))

    with torch.autocast("cpu", torch.bfloat16):
        outs = list(master.ttt_forward(ids, aux.float(), mask, 3))
    loss_of(outs).backward()
    loss_of(copy.ttt_forward(ids, aux.float().bfloat16(), mask, 3)).backward()
    grads = dict(copy.named_parameters())
    for name, p in master.named_parameters():
        if p.grad is None:
            continue
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, grads[name].grad.float()), name
