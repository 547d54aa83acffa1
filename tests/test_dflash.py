"""DFlash plugin: the block objective (loss and gradients) against a slow, plain implementation
written here with loops (one block, one head, one slot at a time), the export layout, and the
block proposer's acceptance in ``specforge eval`` against a slow speculation loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from specforge_defaults.loss import ForwardKLLoss
from specforge_dflash.export import load_export
from specforge_dflash.plugin import DFlashOptions, make_dflash

from specforge_core.components import ObjectiveContext, TargetHead
from specforge_core.training.batch import Batch
from specforge_core.types import TargetInfo
from specforge_core.vocab import VocabMapping

TINY = Path(__file__).resolve().parents[1] / "configs" / "assets" / "tiny-target"


# ------------------------------------------------------------------------------ slow reference
def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_one(v, p, theta):
    """Rotate the pairs (v[i], v[i + d/2]) of one vector by angle p * theta^(-2i/d)."""
    d = v.shape[0]
    out = v.clone()
    for i in range(d // 2):
        ang = p * theta ** (-2 * i / d)
        a, b = v[i], v[i + d // 2]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def slow_block(draft, anchor_token: int, a: int, feats: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """[S, H] normed outputs of the block [anchor, mask...] of S slots (default block_size) at
    positions a.. over context f[0..a-1]."""
    c, sd = draft.config, dict(draft.named_parameters())
    S = slots or c.block_size
    eps, d, nh, nkv = c.rms_norm_eps, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    ctx = rms(feats[:a] @ sd["fc.weight"].T, sd["hidden_norm.weight"], eps)
    x = sd["embed_tokens.weight"][[anchor_token] + [c.mask_token_id] * (S - 1)]
    for li in range(c.num_hidden_layers):
        p = f"layers.{li}."
        hn = rms(x, sd[p + "input_layernorm.weight"], eps)
        heads = []
        for h in range(nh):
            g = h // (nh // nkv)
            wq = sd[p + "self_attn.q_proj.weight"][h * d:(h + 1) * d]
            wk = sd[p + "self_attn.k_proj.weight"][g * d:(g + 1) * d]
            wv = sd[p + "self_attn.v_proj.weight"][g * d:(g + 1) * d]
            qn, kn = sd[p + "self_attn.q_norm.weight"], sd[p + "self_attn.k_norm.weight"]
            keys, vals = [], []
            for pos in range(a):  # context: the target's states before the anchor
                keys.append(rope_one(rms(ctx[pos] @ wk.T, kn, eps), pos, c.rope_theta))
                vals.append(ctx[pos] @ wv.T)
            for i in range(S):  # the whole block, both directions
                keys.append(rope_one(rms(hn[i] @ wk.T, kn, eps), a + i, c.rope_theta))
                vals.append(hn[i] @ wv.T)
            K, V = torch.stack(keys), torch.stack(vals)
            rows = []
            for i in range(S):
                q = rope_one(rms(hn[i] @ wq.T, qn, eps), a + i, c.rope_theta)
                rows.append(torch.softmax(K @ q / math.sqrt(d), 0) @ V)
            heads.append(torch.stack(rows))
        x = x + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        up = F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)
        x = x + up @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["norm.weight"], eps)


def slow_objective(draft, batch: Batch, head_rows, t2d, stride, gamma, lengths=()):
    """sum_j w_j * mean over valid (row, anchor) of soft CE(target at a+j-1 || draft slot j); with
    ``lengths``, the i-th block of row b is a block of lengths[(b + i) % len(lengths)] slots."""
    B = draft.config.block_size
    sums, counts = [0.0] * (B - 1), [0] * (B - 1)
    for b in range(batch.input_ids.shape[0]):
        n = int(batch.lengths[b])
        for a in range(1, n - 1, stride):
            out = None
            L = lengths[(b + (a - 1) // stride) % len(lengths)] if lengths else B
            for j in range(1, L):
                t = a + j
                if t >= n or not batch.loss_mask[b, t] or not t2d[batch.target_argmax[b, t - 1]]:
                    continue
                out = slow_block(draft, int(batch.input_ids[b, a]), a, batch.aux_hidden[b], L) if out is None else out
                p = torch.softmax(batch.final_hidden[b, t - 1] @ head_rows.T, -1)
                logq = torch.log_softmax(out[j] @ draft.lm_head.weight.T, -1)
                sums[j - 1] = sums[j - 1] - (p * logq).sum()
                counts[j - 1] += 1
    w = [math.exp(-(j) / gamma) if gamma > 0 else 1.0 for j in range(B - 1)]
    return sum(w[j] * sums[j] / max(counts[j], 1) for j in range(B - 1)), counts


# ------------------------------------------------------------------------------ fixtures
HF = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 8, "vocab_size": 40, "num_hidden_layers": 8, "rms_norm_eps": 1e-6, "rope_theta": 1000.0,
      "pad_token_id": 0}


def random_batch(gen, lengths, n_aux=3, H=32, V=40):
    Bn, T = len(lengths), max(lengths)
    ids = torch.randint(1, V, (Bn, T), generator=gen)
    lens = torch.tensor(lengths)
    real = torch.arange(T)[None] < lens[:, None]
    ids = ids * real
    mask = (torch.rand(Bn, T, generator=gen) < 0.8) & real
    return Batch(input_ids=ids, loss_mask=mask, attention_mask=real,
                 aux_hidden=torch.randn(Bn, T, n_aux * H, generator=gen) * real[..., None],
                 final_hidden=torch.randn(Bn, T, H, generator=gen) * real[..., None],
                 target_argmax=torch.randint(0, V, (Bn, T), generator=gen) * real, lengths=lens)


def build(opts: DFlashOptions, vd=24, seed=0):
    torch.manual_seed(seed)
    alg = make_dflash(opts)
    vocab = VocabMapping.from_target_ids(torch.randperm(40)[:vd], 40)
    info = TargetInfo(model_path="-", hf_config=HF, aux_layer_ids=[2, 4, 5], hidden_size=32, vocab_size=40,
                      num_hidden_layers=8)
    draft = alg.build(info, vocab)
    with torch.no_grad():  # non-trivial norms, so a mixed-up norm weight shows
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return alg, draft, vocab


@pytest.mark.parametrize("block_size,stride,gamma,layers,lengths", [
    (4, 1, 0.0, 1, ()), (5, 2, 2.0, 2, ()),
    (6, 1, 2.0, 2, (2, 6, 4)),  # blocks of mixed lengths
    (6, 1, 0.0, 1, (3,)),  # every block shorter than block_size: slots 3..5 train nothing
])
def test_objective_equals_slow_reference(block_size, stride, gamma, layers, lengths):
    opts = DFlashOptions(block_size=block_size, num_layers=layers, anchor_stride=stride, loss_decay=gamma,
                         train_block_lengths=list(lengths))
    alg, draft, vocab = build(opts)
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(gen, [11, 7] if not lengths else [15, 11])
    rows = torch.randn(vocab.draft_vocab_size, 32, generator=gen)
    head = TargetHead(rows=rows, t2d=vocab.t2d, draft_ids=vocab.draft_to_target_ids)
    denom = alg.count_targets(batch, head)
    loss, stats = alg.objective(draft, batch, ObjectiveContext(loss=ForwardKLLoss(), head=head, denominators=denom))
    loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}
    draft.zero_grad()

    ref, counts = slow_objective(draft, batch, rows, vocab.t2d, stride, gamma, lengths)
    ref.backward()
    assert denom.tolist() == [float(c) for c in counts] and sum(counts) > 10
    assert stats["valid"].tolist() == [float(c) for c in counts]
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in draft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert not draft.embed_tokens.weight.requires_grad
    metrics = alg.summarize(stats)
    assert metrics["valid_tokens"] == sum(counts) and 0 <= metrics["acc_1"] <= 1


def test_export_layout_and_roundtrip(tmp_path):
    from specforge_core.export import write_export

    alg, draft, vocab = build(DFlashOptions(block_size=4, num_layers=2))
    config, tensors = alg.export(draft, vocab)
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 4
    assert config["dflash_config"] == {"mask_token_id": 0, "target_layer_ids": [1, 3, 4]}  # HF index - 1
    assert config["vocab_size"] == 40 and config["draft_vocab_size"] == 24 and config["num_hidden_layers"] == 2
    # the names vLLM's DFlashQwen3ForCausalLM.load_weights reads (it prefixes "model." except lm_head/d2t)
    layer = {f"layers.{i}.{n}.weight" for i in range(2) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(tensors) == layer | {"fc.weight", "hidden_norm.weight", "norm.weight", "lm_head.weight",
                                    "embed_tokens.weight", "d2t", "t2d"}
    assert tensors["fc.weight"].shape == (32, 96) and tensors["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(torch.arange(24) + tensors["d2t"], vocab.draft_to_target_ids)
    write_export(config, tensors, tmp_path / "export")
    loaded, d2t_ids = load_export(tmp_path / "export")
    assert torch.equal(d2t_ids, vocab.draft_to_target_ids) and loaded.aux_layer_ids == [2, 4, 5]
    for n, t in loaded.state_dict().items():
        torch.testing.assert_close(t, tensors[n].float(), msg=n)



# ------------------------------------------------------------------------------ eval acceptance
def _features(model, seq: list[int], aux_layers):
    with torch.no_grad():
        hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i][0] for i in aux_layers], -1), hs[-1][0]


def _overfit_draft(model, seqs, alg, tmp_path):
    """A draft trained for a few seconds on the target's own greedy continuations of the eval
    prompts, so that the acceptance the test compares is far from zero."""
    from specforge_core.export import write_export
    from specforge_core.training.frozen import TargetWeights

    hf = json.loads((TINY / "config.json").read_text())
    vocab = VocabMapping.from_target_ids(torch.arange(hf["vocab_size"]), hf["vocab_size"])
    info = TargetInfo(model_path=str(TINY), hf_config=hf, aux_layer_ids=[2, 4, 5], hidden_size=hf["hidden_size"],
                      vocab_size=hf["vocab_size"], num_hidden_layers=hf["num_hidden_layers"])
    torch.manual_seed(0)
    weights = TargetWeights(str(TINY), vocab)
    draft = alg.build(info, vocab, weights)
    T = max(len(s) for s in seqs)
    feats = [_features(model, s, [2, 4, 5]) for s in seqs]
    batch = random_batch(torch.Generator().manual_seed(0), [len(s) for s in seqs], H=hf["hidden_size"])
    for b, (s, (aux, fin)) in enumerate(zip(seqs, feats, strict=True)):
        n = len(s)
        batch.input_ids[b, :n] = torch.tensor(s)
        batch.aux_hidden[b, :n], batch.final_hidden[b, :n] = aux, fin
        batch.loss_mask[b] = torch.arange(T) < n
    rows = weights.head_rows()
    batch.target_argmax = (batch.final_hidden @ rows.T).argmax(-1)
    head = TargetHead(rows=rows, t2d=vocab.t2d, draft_ids=vocab.draft_to_target_ids)
    ctx = ObjectiveContext(loss=ForwardKLLoss(), head=head, denominators=alg.count_targets(batch, head))
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        alg.objective(draft, batch, ctx)[0].backward()
        opt.step()
    config, tensors = alg.export(draft, vocab)
    return write_export(config, tensors, tmp_path / "export")


def _slow_speculation(model, draft, d2t, prompt, k, max_new, slots=None):
    """Greedy speculation with full target recomputation and ``slow_block`` of 1 + k slots (as vLLM
    serves it; ``slots`` overrides): matched drafts per cycle."""
    with torch.no_grad():
        out = [int(model(torch.tensor([prompt])).logits[0, -1].argmax())]
        matched = []
        while len(out) < max_new:
            seq = prompt + out
            n = len(seq) - 1
            aux, _ = _features(model, seq, draft.aux_layer_ids)
            h = slow_block(draft, seq[-1], n, aux[:n].float(), slots or k + 1)
            drafts = d2t[(h[1:k + 1] @ draft.lm_head.weight.T).argmax(-1)].tolist()
            nxt = model(torch.tensor([seq + drafts])).logits[0, n:].argmax(-1).tolist()
            m = 0
            while m < k and drafts[m] == nxt[m]:
                m += 1
            matched.append(m)
            out += nxt[: m + 1]
    return matched, out[:max_new]


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [4, 8])  # K = 3 = block_size - 1, and K < block_size - 1
def test_eval_acceptance_equals_slow_loop(tmp_path, block_size):
    from transformers import AutoModelForCausalLM

    from specforge_core.evaluation.accounting import stats_from_cycles
    from specforge_core.evaluation.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    prompts = [[1, 7, 300, 42, 9, 77], [1, 5, 600, 601, 33], [1, 12, 800, 14, 15, 16, 17]]
    K, M = 3, 24
    with torch.no_grad():
        seqs = [model.generate(torch.tensor([p]), max_new_tokens=M + K, do_sample=False, eos_token_id=None
                               )[0].tolist() for p in prompts]
    # trained on the served block length (1 + K slots): a whole-block draft accepts little at K=3
    alg = make_dflash(DFlashOptions(block_size=block_size, num_layers=1, anchor_stride=1, loss_decay=0.0,
                                    train_block_lengths=[K + 1]))
    export = _overfit_draft(model, seqs, alg, tmp_path)
    report = evaluate(export, str(TINY), prompts, steps=K, max_new_tokens=M, eos_ids=(), check=True,
                      batch_size=2, device="cpu", dtype="fp32")
    assert report.ok, report.errors
    draft, d2t = load_export(export)
    total = 0
    for p, pr in zip(prompts, report.prompts, strict=True):
        matched, out = _slow_speculation(model, draft, d2t, p, K, M)
        want = stats_from_cycles(matched, K)
        assert (pr.raw.cycles, pr.raw.tokens, pr.raw.at_least) == (want.cycles, want.tokens, want.at_least)
        assert pr.generated == len(out) and pr.mismatch is None
        total += sum(matched)
    if block_size > K + 1:  # the served 1+K-slot block is not the first K+1 slots of the whole block
        p = prompts[0]
        aux, _ = _features(model, p, draft.aux_layer_ids)
        n = len(p) - 1
        short, whole = slow_block(draft, p[-1], n, aux[:n].float(), K + 1), slow_block(draft, p[-1], n, aux[:n].float())
        assert (short[1:] - whole[1:K + 1]).abs().max() > 1e-3
    assert report.overall.at_least[1] > 0 and total > len(prompts) * 3  # drafts beyond the first are accepted
