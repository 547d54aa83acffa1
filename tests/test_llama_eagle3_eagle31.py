"""EAGLE-3.1 in llama-eagle3 (``fc_norm`` + ``norm_output``): the training loss and every gradient
equal a slow plain implementation written here (dense TTT mask, full softmax, full logits), the
eval proposer's chain equals a slow cache-free greedy chain, and the export carries both keys."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from specforge_defaults.loss import ForwardKLLoss, ForwardKLOptions
from specforge_llama_eagle3.algorithm import build_draft, make_llama_eagle3
from specforge_llama_eagle3.model import LlamaEagle3Draft, apply_rope, cos_sin
from specforge_llama_eagle3.objective import micro_step
from specforge_llama_eagle3.options import LlamaEagle3Options
from specforge_llama_eagle3.proposer import Eagle3ChainProposer

from specforge_core.testing import tiny_config
from specforge_core.training.batch import Batch
from specforge_core.types import TargetInfo

H, V, VD, L, K = 64, 512, 128, 8, 4


def _draft(fc_norm=True, norm_output=True, seed=0) -> LlamaEagle3Draft:
    hf = tiny_config("llama").to_dict()
    info = TargetInfo(model_path="/tiny", hf_config=hf, aux_layer_ids=[2, 4, 5], hidden_size=H, vocab_size=V,
                      num_hidden_layers=L)
    torch.manual_seed(seed)
    m = build_draft(LlamaEagle3Options(fc_norm=fc_norm, norm_output=norm_output), info, VD)
    with torch.no_grad():  # larger-than-default weights so every term matters numerically
        for _, p in m.named_parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
        m.embed_tokens.weight.normal_(0, 1.0)
    return m.double()


def _rms(x, w, eps):
    xf = x.float()  # Llama normalises in fp32 (also fp64 inputs), then scales in x's dtype
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _qkv(m, ids, g, pos):
    Lr, a, eps = m.midlayer, m.midlayer.self_attn, m.config.rms_norm_eps
    B, T = ids.shape
    x = torch.cat([_rms(m.embed_tokens.weight[ids], Lr.input_layernorm.weight, eps),
                   _rms(g, Lr.hidden_norm.weight, eps)], dim=-1)
    cos, sin = cos_sin(m.inv_freq, pos, x.dtype)

    def heads(w, n):
        return (x @ w.T).view(B, T, n, a.head_dim).transpose(1, 2)

    rep = a.n_heads // a.n_kv
    q = apply_rope(heads(a.q_proj.weight, a.n_heads), cos, sin)
    k = apply_rope(heads(a.k_proj.weight, a.n_kv), cos, sin).repeat_interleave(rep, dim=1)
    v = heads(a.v_proj.weight, a.n_kv).repeat_interleave(rep, dim=1)
    return q, k, v


def _finish(m, g, q, keys, vals, mask):
    """Attention of q over keys/vals under ``mask`` [B or 1, T, S], residual, MLP, final norm."""
    Lr, a, eps = m.midlayer, m.midlayer.self_attn, m.config.rms_norm_eps
    B, _, T, _ = q.shape
    s = (q @ keys.transpose(-1, -2)) * a.head_dim ** -0.5
    o = (s.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ vals).transpose(1, 2).reshape(B, T, -1)
    h = g + o @ a.o_proj.weight.T
    u = _rms(h, Lr.post_attention_layernorm.weight, eps)
    h = h + (F.silu(u @ Lr.mlp.gate_proj.weight.T) * (u @ Lr.mlp.up_proj.weight.T)) @ Lr.mlp.down_proj.weight.T
    normed = _rms(h, m.norm.weight, eps)
    return normed, (normed if m.config.norm_output else h)  # EAGLE-3.1: the next step reads normed


def _fc(m, aux):
    eps = m.config.rms_norm_eps
    if m.fc_norm is not None:
        aux = torch.cat([_rms(c, n.weight, eps) for c, n in zip(aux.chunk(3, -1), m.fc_norm, strict=True)], -1)
    return aux @ m.fc.weight.T


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 15
    lengths = torch.tensor([T, 11])
    real = torch.arange(T)[None] < lengths[:, None]
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.randperm(V, generator=g)[:VD]] = True
    in_vocab = t2d.nonzero().squeeze(1)[torch.randint(0, VD, (B, T), generator=g)]
    argmax = torch.where(torch.rand(B, T, generator=g) < 0.8, in_vocab, torch.randint(0, V, (B, T), generator=g))
    batch = Batch(
        input_ids=torch.randint(0, V, (B, T), generator=g) * real,
        loss_mask=real & (torch.rand(B, T, generator=g) < 0.8),
        attention_mask=real,
        aux_hidden=torch.randn(B, T, 3 * H, generator=g, dtype=torch.float64) * real[..., None],
        final_hidden=torch.randn(B, T, H, generator=g, dtype=torch.float64) * real[..., None],
        target_argmax=argmax * real,  # mostly in the draft vocab: most rows carry loss
        lengths=lengths,
    )
    head = torch.randn(VD, H, generator=g, dtype=torch.float64) * H ** -0.5
    return batch, head, t2d


def _slow_loss(m, batch, head, t2d, decay=0.8):
    """The TTT objective the slow way: step k at position t reads x_{t+k+1} at rope position t+k,
    sees step 0's keys causally (real keys only) and its own keys of steps 1..k; its normed output
    is taught by the target's distribution at t+k+1 where x_{t+k+2} exists, is learned and the
    target's argmax is in the draft vocab; per-step mean over those rows, weighted decay**k."""
    ids, T = batch.input_ids, batch.input_ids.shape[1]
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    g = _fc(m, batch.aux_hidden)
    keys, vals, total = [], [], 0.0
    for k in range(K):
        shifted = torch.zeros_like(ids)
        shifted[:, : T - k - 1] = ids[:, k + 1:]
        q, kk, vv = _qkv(m, shifted, g, torch.arange(T) + k)
        keys.append(kk)
        vals.append(vv)
        causal = (s <= t)[None] & (batch.attention_mask[:, None, :] | (s == t)[None])
        mask = torch.cat([causal] + [(s == t)[None].expand_as(causal)] * k, dim=-1)
        normed, g = _finish(m, g, q, torch.cat(keys, 2), torch.cat(vals, 2), mask)
        ce = torch.zeros(ids.shape, dtype=torch.float64)
        valid = torch.zeros(ids.shape, dtype=torch.bool)
        for b in range(ids.shape[0]):
            for p in range(T):
                n = p + k + 2
                if n < int(batch.lengths[b]) and batch.loss_mask[b, n] and t2d[batch.target_argmax[b, p + k + 1]]:
                    valid[b, p] = True
                    target = torch.softmax(head @ batch.final_hidden[b, p + k + 1], -1)
                    ce[b, p] = -(target * torch.log_softmax(m.lm_head.weight @ normed[b, p], -1)).sum()
        total = total + decay ** k * ce[valid].sum() / valid.sum().clamp(min=1)
    return total


def _loss_and_grads(m, fn):
    m.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fc_norm,norm_output", [(True, True), (False, True)])
def test_eagle31_loss_and_grads_equal_a_slow_plain_implementation(fc_norm, norm_output):
    m = _draft(fc_norm, norm_output)
    batch, head, t2d = _batch()
    loss_fn = ForwardKLLoss(ForwardKLOptions(chunk_size=5))
    fast = micro_step(m.ttt_forward, m.lm_head.weight, loss_fn, batch, head, t2d, K)
    assert fast[1]["count"].sum() > 20  # enough rows carry loss
    got, g = _loss_and_grads(m, lambda: micro_step(m.ttt_forward, m.lm_head.weight, loss_fn, batch, head, t2d, K)[0])
    want, w = _loss_and_grads(m, lambda: _slow_loss(m, batch, head, t2d))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert set(g) == set(w) and ("fc_norm.0.weight" in g) == fc_norm
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-8, atol=1e-11, msg=lambda s, n=name: f"{n}: {s}")
    # norm_output changes the objective (not a no-op flag)
    plain = _draft(fc_norm, False)
    with torch.no_grad():
        assert abs(float(_slow_loss(plain, batch, head, t2d)) - float(want)) > 1e-3


def test_eagle31_proposer_chain_equals_a_slow_greedy_chain():
    """Eval's chain (KV cache, batched rows) vs recomputing every entry from scratch each step."""
    m = _draft().eval()
    m.d2t = torch.zeros(VD, dtype=torch.int64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (9, 6)]
    feats = [torch.randn(n, 3 * H, generator=g, dtype=torch.float64) for n in (9, 6)]
    prop = Eagle3ChainProposer(m, torch.device("cpu"))
    prop.begin([p.tolist() for p in prompts])
    # entry p reads x[p+1] beside fc(f[p]) (observe gets the tokens each entry reads)
    prop.observe([p[1:].tolist() for p in prompts], [f[:-1] for f in feats])
    drafts = prop.propose(4)
    for row, (x, f) in enumerate(zip(prompts, feats, strict=True)):
        ids, hid = x[1:].tolist(), list(_fc(m, f[:-1]))
        want = []
        with torch.no_grad():
            for _ in range(4):
                S = len(ids)
                q, k, v = _qkv(m, torch.tensor([ids]), torch.stack(hid)[None], torch.arange(S))
                normed, nxt = _finish(m, torch.stack(hid)[None], q, k, v, torch.ones(S, S, dtype=torch.bool).tril()[None])
                tok = int((normed[0, -1] @ m.lm_head.weight.T).argmax())
                want.append(tok)
                ids.append(tok)
                hid.append(nxt[0, -1])
        assert drafts[row] == want, row


def test_eagle31_export_keys_and_roundtrip(tmp_path):
    from specforge_core.export import write_export
    from specforge_core.vocab import VocabMapping

    vocab = VocabMapping.from_target_ids(torch.arange(VD), V)
    alg = make_llama_eagle3(LlamaEagle3Options(fc_norm=True, norm_output=True))
    config, tensors = alg.export(_draft(), vocab)
    assert config["fc_norm"] is True and config["norm_output"] is True
    assert {f"fc_norm.{i}.weight" for i in range(3)} <= set(tensors)
    back = LlamaEagle3Draft.from_export(write_export(config, tensors, tmp_path / "e31"))
    assert back.config.norm_output and back.fc_norm is not None
    plain, _ = make_llama_eagle3(None).export(_draft(False, False), vocab)
    assert "norm_output" not in plain and "fc_norm" not in plain  # EAGLE-3 exports are unchanged
    assert json.loads((tmp_path / "e31" / "config.json").read_text())["norm_output"] is True


def test_plan_counts_the_fc_norm_weights(monkeypatch):
    from pathlib import Path

    from specforge_core import plan as P
    from specforge_core.config import load_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipe names its target relative to the repo root

    def trainable(*overrides):
        cfg = load_config([root / "configs/qwen3-8b-hf-1node-3gpu.toml"], list(overrides))
        return P.build_plan(cfg)["draft_trainable"]

    plain = trainable()
    assert trainable("model.llama-eagle3.fc_norm=true") == plain + 3 * 4096  # one [H_t] weight per aux layer
    assert trainable("model.llama-eagle3.norm_output=true") == plain  # no weights


def _slow_speculation(model, draft, prompt, aux_layers, k, max_new):
    """Greedy speculation recomputed from scratch every cycle: the target's features of the whole
    sequence, the draft's chain without a cache (``_qkv``/``_finish``), the target's verdict on the
    sequence + drafts. Returns the matched drafts per cycle and the output."""
    d2t = torch.arange(draft.config.draft_vocab_size) + draft.d2t
    with torch.no_grad():
        out = [int(model(torch.tensor([prompt])).logits[0, -1].argmax())]
        matched = []
        while len(out) < max_new:
            seq = prompt + out
            n = len(seq) - 1
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            aux = torch.cat([hs[i][0] for i in aux_layers], -1)
            ids, hid = seq[1:], list(_fc(draft, aux[:n]))  # entry p reads x[p+1] beside fc(f[p])
            drafts = []
            for _ in range(k):
                S = len(ids)
                g = torch.stack(hid)[None]
                q, kk, vv = _qkv(draft, torch.tensor([ids]), g, torch.arange(S))
                normed, nxt_h = _finish(draft, g, q, kk, vv, torch.ones(S, S, dtype=torch.bool).tril()[None])
                tok = int(d2t[(normed[0, -1] @ draft.lm_head.weight.T).argmax()])
                drafts.append(tok)
                ids.append(tok)
                hid.append(nxt_h[0, -1])
            verdict = model(torch.tensor([seq + drafts])).logits[0, n:].argmax(-1).tolist()
            m = 0
            while m < k and drafts[m] == verdict[m]:
                m += 1
            matched.append(m)
            out += verdict[: m + 1]
    return matched, out[:max_new]


@pytest.mark.slow
def test_eagle31_eval_counts_equal_a_slow_speculation_loop(tmp_path):
    """``specforge eval`` of a trained EAGLE-3.1 draft (fc_norm + norm_output): per-prompt counts
    equal the slow loop's."""
    from pathlib import Path

    from specforge_llama_eagle3.config import default_aux_layer_ids
    from transformers import AutoModelForCausalLM

    from specforge_core.config import load_config
    from specforge_core.evaluation.accounting import stats_from_cycles
    from specforge_core.evaluation.evaluate import evaluate
    from specforge_core.pipeline.local import run_local

    root = Path(__file__).resolve().parents[1]
    tiny = root / "configs" / "assets" / "tiny-target"
    cfg = load_config([root / "configs" / "quickstart.toml"], overrides=[
        f"run.output_dir={tmp_path / 'run'}", "training.max_steps=40", "logging.progress=false",
        f"dataset.cache_dir={tmp_path / 'cache'}", "model.llama-eagle3.fc_norm=true",
        "model.llama-eagle3.norm_output=true"])
    export = Path(run_local(cfg).export_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    draft = LlamaEagle3Draft.from_export(export, embed_weight=model.get_input_embeddings().weight.detach())
    assert draft.config.norm_output and draft.fc_norm is not None
    aux_layers = default_aux_layer_ids(model.config.num_hidden_layers)
    prompts = [[1, 7, 300, 42, 9, 77], [1, 5, 600, 601, 33], [1, 12, 800, 14, 15, 16, 17]]
    K, M = 3, 24
    report = evaluate(str(export), str(tiny), prompts, steps=K, max_new_tokens=M, eos_ids=(), check=True,
                      batch_size=2, device="cpu", dtype="fp32")
    assert report.ok, report.errors
    total = 0
    for p, pr in zip(prompts, report.prompts, strict=True):
        matched, out = _slow_speculation(model, draft, p, aux_layers, K, M)
        want = stats_from_cycles(matched, K)
        assert (pr.raw.cycles, pr.raw.tokens, pr.raw.at_least) == (want.cycles, want.tokens, want.at_least)
        assert pr.generated == len(out)
        total += sum(matched)
    assert total > 0  # some drafts accepted: not a degenerate comparison
