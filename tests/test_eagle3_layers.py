"""llama-eagle3 with N decoder layers (``model.llama-eagle3.num_layers``), as vLLM's llama_eagle3
serves them: num_layers = 1 is the one-layer model bit for bit; N = 2 follows vLLM's forward
(re-implemented plainly below), its cached chain reproduces TTT, its export round-trips under
vLLM's names, and it trains (one-sample overfit on a tiny real target)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from specforge_llama_eagle3.algorithm import build_draft, draft_params, draft_shape
from specforge_llama_eagle3.config import DraftConfigError
from specforge_llama_eagle3.model import DraftCache, LlamaEagle3Draft
from specforge_llama_eagle3.options import LlamaEagle3Options
from specforge_llama_eagle3.proposer import Eagle3ChainProposer

from specforge_core.testing import tiny_config
from specforge_core.types import TargetInfo

H, V, VD, L = 64, 512, 128, 8


def _target() -> TargetInfo:
    hf = tiny_config("llama").to_dict()
    return TargetInfo(model_path="/tiny", hf_config=hf, aux_layer_ids=[2, L // 2, L - 3],
                      hidden_size=H, vocab_size=V, num_hidden_layers=L)


def _draft(num_layers: int, seed: int = 0) -> LlamaEagle3Draft:
    torch.manual_seed(seed)
    m = build_draft(LlamaEagle3Options(num_layers=num_layers), _target(), VD)
    with torch.no_grad():  # larger-than-default weights so every term matters numerically
        for p in m.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
        m.embed_tokens.weight.normal_(0, 1.0)
    return m.double().eval()


def _batch(T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (1, T), generator=g), torch.randn(1, T, 3 * H, generator=g, dtype=torch.float64)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ N = 1 unchanged
# Fingerprints of the one-layer model before num_layers existed (commit b823125, same procedure):
# the default init under seed 0, and fp64 TTT logits on one thread (BLAS reduction order is fixed).
INIT_DIGEST, TTT_DIGEST = "fcea9c599405889c", "c48bd5e0f0aa682d"


def test_one_layer_is_bit_identical_to_the_single_layer_model():
    torch.manual_seed(0)
    m = build_draft(LlamaEagle3Options(num_layers=1), _target(), VD)
    sd = m.state_dict()
    assert _digest([sd[k] for k in sorted(sd) if k != "embed_tokens.weight"]) == INIT_DIGEST
    assert list(m.export_state_dict()) == list(m.export_keys) and not any(k.startswith("layers.") for k in sd)
    assert m.export_config()["num_hidden_layers"] == 1
    m = m.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.embed_tokens.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    ids = torch.randint(0, V, (2, 10), generator=g)
    aux = torch.randn(2, 10, 3 * H, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = [m.logits(h) for h in m.ttt_forward(ids, aux, mask, 3)]
    finally:
        torch.set_num_threads(threads)
    assert _digest(logits) == TTT_DIGEST


# ------------------------------------------------------------------------------------ vLLM's forward
def _rms(x, w, eps):
    xf = x.float()  # normalised in fp32, as HF's and vLLM's RMSNorm do
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _add_rms(x, residual, w, eps):
    """vLLM's fused RMSNorm(x, residual): (norm(x + residual), x + residual)."""
    s = x + residual
    return _rms(s, w, eps), s


def _attention(x, attn, positions, theta):
    T, D = x.shape[0], attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(T, attn.n_heads, D).transpose(0, 1)
    k = (x @ attn.k_proj.weight.T).view(T, attn.n_kv, D).transpose(0, 1)
    v = (x @ attn.v_proj.weight.T).view(T, attn.n_kv, D).transpose(0, 1)
    # rope in fp32, as HF and vLLM compute it, then in the activations' dtype
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = torch.cat([positions[:, None].float() * inv] * 2, -1)
    cos, sin = ang.cos().double(), ang.sin().double()

    def rope(t):
        return t * cos + torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1) * sin

    q, k = rope(q), rope(k)
    rep = attn.n_heads // attn.n_kv
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = (q @ k.transpose(1, 2)) * D ** -0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ attn.o_proj.weight.T


def _mlp(x, mlp):
    return (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def vllm_forward(m: LlamaEagle3Draft, ids, hidden, positions):
    """vLLM's ``LlamaModel.forward`` of llama_eagle3 (v0.32), line by line, for one sequence:
    returns (normed hidden for the lm_head, aux_output = the next step's hidden)."""
    eps, theta = m.config.rms_norm_eps, m.config.rope_theta
    embeds = m.embed_tokens(ids)
    residual = None
    for i, layer in enumerate([m.midlayer, *m.layers.values()]):
        if i == 0:  # layer 0: [input_layernorm(embeds); hidden_norm(hidden)], residual = hidden
            e = _rms(embeds, layer.input_layernorm.weight, eps)
            residual = hidden
            hidden = torch.cat([e, _rms(hidden, layer.hidden_norm.weight, eps)], dim=-1)
        else:  # later layers: hidden and residual only
            hidden, residual = _add_rms(hidden, residual, layer.input_layernorm.weight, eps)
        hidden = _attention(hidden, layer.self_attn, positions, theta)
        hidden, residual = _add_rms(hidden, residual, layer.post_attention_layernorm.weight, eps)
        hidden = _mlp(hidden, layer.mlp)
    normed, prenorm = _add_rms(hidden, residual, m.norm.weight, eps)
    return normed, prenorm


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_step_equals_vllm_forward(num_layers):
    m = _draft(num_layers)
    T = 12
    ids, aux = _batch(T=T)
    with torch.no_grad():
        g = m.fuse(aux)
        ref_normed, ref_next = vllm_forward(m, ids[0, 1:], g[0, :-1], torch.arange(T - 1))
        normed, nxt = m.forward_cached(ids[:, 1:], g[:, :-1], torch.arange(T - 1)[None], DraftCache())
        ttt0 = next(m.ttt_forward(ids, aux, torch.ones(1, T, dtype=torch.bool), 1))
    # fp64 activations, fp32 norms and rope on both sides: they agree to fp32 rounding (a wrong
    # residual, norm or input width differs by O(1))
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed[0], ref_normed, **tol)
    torch.testing.assert_close(nxt[0], ref_next, **tol)
    torch.testing.assert_close(ttt0[0, : T - 1], normed[0], rtol=1e-10, atol=1e-10)
    later = [n for n, _ in m.named_parameters() if n.startswith("layers.")]
    assert len(later) == 9 * (num_layers - 1)
    assert all(m.get_parameter(n).shape[-1] == H for n in later if "q_proj" in n)  # q/k/v over H, not 2H


def test_two_layer_chain_drafting_reproduces_ttt_steps():
    m = _draft(2)
    T, K = 12, 4
    ids, aux = _batch(T=T)
    with torch.no_grad():
        steps = list(m.ttt_forward(ids, aux, torch.ones(1, T, dtype=torch.bool), K))
        fused = m.fuse(aux)
        cache = DraftCache()
        for t in range(T - K):
            cache.crop(t)
            normed, out = m.forward_cached(ids[:, t + 1: t + 2], fused[:, t: t + 1], torch.tensor([[t]]), cache)
            torch.testing.assert_close(normed[:, 0], steps[0][:, t], rtol=1e-10, atol=1e-10)
            for k in range(1, K):
                normed, out = m.forward_cached(ids[:, t + k + 1: t + k + 2], out, torch.tensor([[t + k]]), cache)
                torch.testing.assert_close(normed[:, 0], steps[k][:, t], rtol=1e-10, atol=1e-10)
            assert len(cache) == t + K and cache.k[1].shape[2] == t + K  # both layers' keys


def test_two_layer_proposer_chain_equals_teacher_forced_greedy():
    """The eval proposer (per-layer caches, one mask) drafts what the cached model drafts."""
    m = _draft(2)
    T, K = 10, 3
    ids, aux = _batch(T=T)
    p = Eagle3ChainProposer(m, "cpu")
    p.begin([ids[0, :T].tolist()])
    p.observe([ids[0, 1:].tolist()], [aux[0, : T - 1]])
    drafts = p.propose(K)[0]
    with torch.no_grad():  # the same chain by hand
        cache = DraftCache()
        normed, out = m.forward_cached(ids[:, 1:], m.fuse(aux[:, : T - 1]), torch.arange(T - 1)[None], cache)
        normed, out = normed[:, -1:], out[:, -1:]
        want = []
        for j in range(K):
            tok = int(p.draft_to_target[m.logits(normed)[0, -1].argmax()])
            want.append(tok)
            if j + 1 < K:
                normed, out = m.forward_cached(torch.tensor([[tok]]), out, torch.tensor([[T - 2 + j + 1]]), cache)
    assert drafts == want


# ------------------------------------------------------------------------------------ export, config, plan
def test_two_layer_export_names_and_round_trip(tmp_path):
    from safetensors.torch import save_file

    m = _draft(2).float()
    sd = m.export_state_dict()
    assert not any(k.startswith("midlayer.") for k in sd)  # N > 1: vLLM's layers.{i} throughout
    assert {k for k in sd if k.startswith("layers.0.")} == {
        "layers.0." + k[len("midlayer."):] for k in m.export_keys if k.startswith("midlayer.")}
    assert sd["layers.0.self_attn.q_proj.weight"].shape == (64, 2 * H)
    assert sd["layers.1.self_attn.q_proj.weight"].shape == (64, H)
    assert "layers.1.hidden_norm.weight" not in sd  # vLLM reads hidden_norm only in layer 0
    cfg = m.export_config()
    assert cfg["num_hidden_layers"] == 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "model.safetensors"))
    back = LlamaEagle3Draft.from_export(tmp_path, embed_weight=m.embed_tokens.weight.detach())
    assert back.num_layers == 2
    for key in m.export_keys:
        torch.testing.assert_close(back.state_dict()[key], m.state_dict()[key].to(torch.bfloat16).float())
    # a 1-layer reader of this export would miss layer 1: from_export builds what the config says
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(KeyError, match="layers.2"):
        LlamaEagle3Draft.from_export(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 0}))
    with pytest.raises(DraftConfigError, match="num_hidden_layers = 0"):
        LlamaEagle3Draft.from_export(tmp_path)


def test_config_file_must_agree_with_num_layers(tmp_path):
    p = tmp_path / "draft.json"
    p.write_text(json.dumps({**tiny_config("llama").to_dict(), "num_hidden_layers": 2}))
    with pytest.raises(DraftConfigError, match="num_hidden_layers = 2 but model.llama-eagle3.num_layers is 1"):
        build_draft(LlamaEagle3Options(config=str(p)), _target(), VD)
    assert build_draft(LlamaEagle3Options(config=str(p), num_layers=2), _target(), VD).num_layers == 2


@pytest.mark.parametrize("num_layers", [1, 2])
def test_plan_counts_the_built_parameters(num_layers):
    class Cfg:
        class model:
            draft_vocab_size = VD

    opts = LlamaEagle3Options(num_layers=num_layers)
    m = build_draft(opts, _target(), VD)
    d, _ = draft_shape(Cfg, opts, _target().hf_config)
    trainable, frozen = draft_params(d, 3, num_layers)
    assert trainable == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert frozen == m.embed_tokens.weight.numel()


# ------------------------------------------------------------------------------------ it trains
def test_two_layers_overfit_one_sample_every_ttt_step(tmp_path):
    """A 2-layer draft memorises one conversation of a tiny real target (8 layers) at every TTT step."""
    from test_training_trainer import memorise, one_sample, peaked_target, vocab_covering

    from specforge_core.config import load_config
    from specforge_core.training.components import create
    from specforge_core.training.trainer import Trainer

    target = peaked_target(tmp_path / "target", V)
    K = 3
    cfg = load_config(data={
        "run": {"name": "t", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"target": str(target), "draft_vocab_size": VD,
                  "llama-eagle3": {"ttt_length": K, "num_layers": 2}},
        "training": {"scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0, "lr": 1e-2},
    })
    backend = create(cfg, "target_backend", cfg, "cpu")
    assert backend.info.num_hidden_layers >= 8
    feats = backend.generate([one_sample()])
    trainer = Trainer(cfg, backend.info, vocab_covering(feats), total_steps=300)
    assert trainer.draft.num_layers == 2
    first, m = memorise(trainer, feats, K)
    assert m["valid_tokens"] >= 10
    assert [m[f"acc_{k}"] for k in range(K)] == pytest.approx([1.0] * K, abs=0.01), m
    assert m["loss"] < 0.5 * first["loss"]


def test_serving_flags_name_no_sglang_for_more_layers():
    # SGLang's LlamaForCausalLMEagle3 has one midlayer: it would drop layers.1 and serve another model
    one = Eagle3ChainProposer(_draft(1), "cpu").serving_flags("/d", 3, None)
    two = Eagle3ChainProposer(_draft(2), "cpu").serving_flags("/d", 3, None)
    assert one["sglang"] and one["vllm"] and two["vllm"] == one["vllm"]
    assert two["sglang"] is None
