"""P-EAGLE plugin: the COD-chain objective (loss and gradients) against a slow, plain implementation
written here with loops (one element, one head, one visible key at a time), the COD sampling's
structure, the export layout, and the proposer's acceptance in ``specforge eval`` against a slow
speculation loop that recomputes everything each cycle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from specforge_defaults.loss import ForwardKLLoss
from specforge_peagle import objective
from specforge_peagle.export import load_export
from specforge_peagle.plugin import PEagleOptions, make_peagle

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


def slow_forward(draft, elements, visible):
    """Normed outputs [E, H] of a list of elements (token, feature or None = masked, position),
    where ``visible(i)`` lists the elements element i attends to; plain loops."""
    c, sd = draft.config, dict(draft.named_parameters())
    eps, d, nh, nkv = c.rms_norm_eps, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    emb = torch.stack([sd["embed_tokens.weight"][t] for t, _, _ in elements])
    feats = torch.stack([sd["mask_hidden"][0] if f is None else f for _, f, _ in elements])
    h = feats @ sd["fc.weight"].T
    for li in range(c.num_hidden_layers):
        p = f"layers.{li}."
        if li == 0:
            inp = torch.cat([rms(emb, sd[p + "input_layernorm.weight"], eps), rms(h, sd[p + "hidden_norm.weight"], eps)], -1)
        else:
            inp = rms(h, sd[p + "input_layernorm.weight"], eps)
        heads = []
        for hh in range(nh):
            g = hh // (nh // nkv)
            wq = sd[p + "self_attn.q_proj.weight"][hh * d:(hh + 1) * d]
            wk = sd[p + "self_attn.k_proj.weight"][g * d:(g + 1) * d]
            wv = sd[p + "self_attn.v_proj.weight"][g * d:(g + 1) * d]
            all_keys = [rope_one(inp[j] @ wk.T, pos, c.rope_theta) for j, (_, _, pos) in enumerate(elements)]
            rows = []
            for i, (_, _, pos) in enumerate(elements):
                q = rope_one(inp[i] @ wq.T, pos, c.rope_theta)
                keys = torch.stack([all_keys[j] for j in visible(i)])
                vals = torch.stack([inp[j] @ wv.T for j in visible(i)])
                rows.append(torch.softmax(keys @ q / math.sqrt(d), 0) @ vals)
            heads.append(torch.stack(rows))
        h = h + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        h = h + (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[
            p + "mlp.down_proj.weight"].T
    return rms(h, sd["norm.weight"], eps)


def slow_objective(draft, batch: Batch, head_rows, t2d, chains):
    """Mean over every valid element of every depth of soft CE(target || draft); ``chains[b][a]`` =
    masked slots of anchor a. Returns (loss, valid count per depth)."""
    K = draft.config.num_depths
    total, counts = 0.0, [0] * K
    for b in range(batch.input_ids.shape[0]):
        n, T = int(batch.lengths[b]), batch.input_ids.shape[1]
        ids = batch.input_ids[b].tolist()
        els = [(ids[p + 1] if p + 1 < T else 0, batch.aux_hidden[b, p], p) for p in range(T)]
        where = {}  # (anchor, depth) -> element index
        for p in range(T):
            where[(p, 0)] = p
        for a in range(T):
            for d in range(1, chains[b][a] + 1):
                where[(a, d)] = len(els)
                els.append((draft.config.mask_token_id, None, a + d))
        key = {i: ad for ad, i in where.items()}

        def visible(i, key=key, where=where):
            a, d = key[i]
            return [where[(p, 0)] for p in range(a + 1)] + [where[(a, j)] for j in range(1, d + 1)]

        out = slow_forward(draft, els, visible)
        for (a, d), i in where.items():
            t = a + d + 2
            if t >= n or not batch.loss_mask[b, t] or not t2d[batch.target_argmax[b, t - 1]]:
                continue
            p = torch.softmax(batch.final_hidden[b, t - 1] @ head_rows.T, -1)
            total = total - (p * torch.log_softmax(out[i] @ draft.lm_head.weight.T, -1)).sum()
            counts[d] += 1
    return total / max(sum(counts), 1), counts


# ------------------------------------------------------------------------------ fixtures
HF = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 8, "vocab_size": 40, "num_hidden_layers": 8, "rms_norm_eps": 1e-6, "rope_theta": 1000.0,
      "pad_token_id": 0}


def random_batch(gen, lengths, n_aux=3, H=32, V=40, learned=0.8):
    Bn, T = len(lengths), max(lengths)
    ids = torch.randint(1, V, (Bn, T), generator=gen)
    lens = torch.tensor(lengths)
    real = torch.arange(T)[None] < lens[:, None]
    ids = ids * real
    mask = (torch.rand(Bn, T, generator=gen) < learned) & real
    return Batch(input_ids=ids, loss_mask=mask, attention_mask=real,
                 aux_hidden=torch.randn(Bn, T, n_aux * H, generator=gen) * real[..., None],
                 final_hidden=torch.randn(Bn, T, H, generator=gen) * real[..., None],
                 target_argmax=torch.randint(0, V, (Bn, T), generator=gen) * real, lengths=lens)


def build(opts: PEagleOptions, vd=24, seed=0):
    torch.manual_seed(seed)
    alg = make_peagle(opts)
    vocab = VocabMapping.from_target_ids(torch.randperm(40)[:vd], 40)
    info = TargetInfo(model_path="-", hf_config=HF, aux_layer_ids=[2, 4, 5], hidden_size=32, vocab_size=40,
                      num_hidden_layers=8)
    draft = alg.build(info, vocab)
    with torch.no_grad():  # non-trivial norms and mask feature, so a mixed-up weight shows
        for name, p in draft.named_parameters():
            if "norm" in name or name == "mask_hidden":
                p.add_(0.3 * torch.randn_like(p))
    return alg, draft, vocab


@pytest.mark.parametrize("depths,layers,ratio", [(3, 1, 0.7), (4, 2, 0.9)])
def test_objective_equals_slow_reference(depths, layers, ratio):
    opts = PEagleOptions(num_depths=depths, num_layers=layers, down_sample_ratio=ratio, down_sample_ratio_min=0.3)
    alg, draft, vocab = build(opts)
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(gen, [11, 7])
    rows = torch.randn(vocab.draft_vocab_size, 32, generator=gen)
    head = TargetHead(rows=rows, t2d=vocab.t2d, draft_ids=vocab.draft_to_target_ids)
    denom = alg.count_targets(batch, head)
    loss, stats = alg.objective(draft, batch, ObjectiveContext(loss=ForwardKLLoss(), head=head, denominators=denom))
    loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}
    draft.zero_grad()

    learned, _ = objective.learned_targets(batch, depths, vocab.t2d)
    D = objective.chain_depths(batch, learned, depths, ratio, 0.3, alg.seed)
    ref, counts = slow_objective(draft, batch, rows, vocab.t2d, D.tolist())
    ref.backward()
    assert denom.tolist() == [float(c) for c in counts] and counts[0] > 5 and counts[1] > 0
    assert stats["valid"].tolist() == [float(c) for c in counts]
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in draft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert draft.embed_tokens.weight.requires_grad and draft.mask_hidden.grad.abs().sum() > 0
    metrics = alg.summarize(stats)
    assert metrics["valid_tokens"] == sum(counts) and 0 <= metrics["acc_1"] <= 1


def test_cod_chains_nested_deterministic_and_at_the_peers_rates():
    depths, ratio, rmin = 6, 0.7, 0.2
    gen = torch.Generator().manual_seed(3)
    batch = random_batch(gen, [400, 300, 350], learned=1.0)
    t2d = torch.ones(40, dtype=torch.bool)
    learned, _ = objective.learned_targets(batch, depths, t2d)
    D = objective.chain_depths(batch, learned, depths, ratio, rmin, seed=0)
    assert torch.equal(D, objective.chain_depths(batch, learned, depths, ratio, rmin, seed=0))  # same batch
    assert not torch.equal(D, objective.chain_depths(batch, learned, depths, ratio, rmin, seed=1))  # run seed
    regrouped = Batch(**{k: getattr(batch, k)[[1, 0, 2]] for k in ("input_ids", "loss_mask", "attention_mask",
                         "aux_hidden", "final_hidden", "target_argmax", "lengths")})
    assert not torch.equal(D[[1, 0, 2]], objective.chain_depths(regrouped, learned[[1, 0, 2]], depths, ratio,
                                                                  rmin, seed=0))  # new draws when regrouped
    # a chain never runs past a token that is not learned (nor past the row's end)
    for b in range(3):
        n = int(batch.lengths[b])
        for a in range(D.shape[1]):
            assert a + int(D[b, a]) + 2 < n or int(D[b, a]) == 0
    # every anchor with learned targets reaches depth d with probability max(r^d, r_min)
    room = torch.stack([learned[..., 1:d + 1].all(-1) for d in range(1, depths)], -1)  # [B, T, K-1]
    for d in range(1, depths):
        frac = float((D >= d)[room[..., d - 1]].float().mean())
        assert abs(frac - max(ratio ** d, rmin)) < 0.05, (d, frac)
    # a chain stops at the first unlearned token it would predict
    batch.loss_mask[0, 50] = False
    learned, _ = objective.learned_targets(batch, depths, t2d)
    D2 = objective.chain_depths(batch, learned, depths, ratio, rmin, seed=0)
    assert all(int(D2[0, a]) <= 48 - a - 1 for a in range(44, 48)) and int(D2[0, 48]) == D[0, 48]


def test_export_layout_and_roundtrip(tmp_path):
    from specforge_core.export import write_export

    alg, draft, vocab = build(PEagleOptions(num_depths=4, num_layers=2))
    config, tensors = alg.export(draft, vocab)
    assert config["architectures"] == ["Eagle3LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    assert config["mask_token_id"] == 0 and config["parallel_drafting"] is True
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and config["num_aux_hidden_states"] == 3
    assert config["vocab_size"] == 40 and config["draft_vocab_size"] == 24 and config["rope_theta"] == 1000.0
    # the names vLLM's Eagle3LlamaForCausalLM.load_weights reads (it prefixes "model." except lm_head)
    layer = {f"layers.{i}.{n}.weight" for i in range(2) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(tensors) == layer | {"layers.0.hidden_norm.weight", "fc.weight", "norm.weight", "lm_head.weight",
                                    "embed_tokens.weight", "mask_hidden", "d2t", "t2d"}
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (32, 64)  # layer 0: [embedding, feature]
    assert tensors["layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert tensors["mask_hidden"].shape == (1, 96) and tensors["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(torch.arange(24) + tensors["d2t"], vocab.draft_to_target_ids)
    write_export(config, tensors, tmp_path / "export")
    loaded, d2t_ids = load_export(tmp_path / "export")
    assert torch.equal(d2t_ids, vocab.draft_to_target_ids) and loaded.aux_layer_ids == [2, 4, 5]
    assert loaded.config.num_depths == 4
    for n, t in loaded.state_dict().items():
        torch.testing.assert_close(t, tensors[n].float(), msg=n)


# ------------------------------------------------------------------------------ eval acceptance
def _features(model, seq: list[int], aux_layers):
    with torch.no_grad():
        hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i][0] for i in aux_layers], -1), hs[-1][0]


def overfit_draft(model, seqs, alg, tmp_path, steps=60):
    """A draft trained for a few seconds on the target's own greedy continuations of the eval
    prompts, so that the acceptance the tests compare is far from zero."""
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
    batch = random_batch(torch.Generator().manual_seed(0), [len(s) for s in seqs], H=hf["hidden_size"])
    for b, s in enumerate(seqs):
        n = len(s)
        aux, fin = _features(model, s, [2, 4, 5])
        batch.input_ids[b, :n] = torch.tensor(s)
        batch.aux_hidden[b, :n], batch.final_hidden[b, :n] = aux, fin
        batch.loss_mask[b] = torch.arange(T) < n
    rows = weights.head_rows()
    batch.target_argmax = (batch.final_hidden @ rows.T).argmax(-1)
    head = TargetHead(rows=rows, t2d=vocab.t2d, draft_ids=vocab.draft_to_target_ids)
    ctx = ObjectiveContext(loss=ForwardKLLoss(), head=head, denominators=alg.count_targets(batch, head))
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        alg.objective(draft, batch, ctx)[0].backward()
        opt.step()
    config, tensors = alg.export(draft, vocab)
    return write_export(config, tensors, tmp_path / "export")


def slow_speculation(model, draft, d2t, prompt, k, max_new):
    """Greedy speculation with full target and draft recomputation, the draft's elements
    [(x[p+1], f[p]) p < n] + k-1 masked slots in causal order (as vLLM serves parallel drafting):
    matched drafts per cycle."""
    with torch.no_grad():
        out = [int(model(torch.tensor([prompt])).logits[0, -1].argmax())]
        matched = []
        while len(out) < max_new:
            seq = prompt + out
            n = len(seq) - 1
            aux, _ = _features(model, seq, draft.aux_layer_ids)
            els = [(seq[p + 1], aux[p].float(), p) for p in range(n)]
            els += [(draft.config.mask_token_id, None, n + j) for j in range(k - 1)]
            h = slow_forward(draft, els, lambda i: list(range(i + 1)))
            drafts = d2t[(h[n - 1:] @ draft.lm_head.weight.T).argmax(-1)].tolist()
            nxt = model(torch.tensor([seq + drafts])).logits[0, n:].argmax(-1).tolist()
            m = 0
            while m < k and drafts[m] == nxt[m]:
                m += 1
            matched.append(m)
            out += nxt[: m + 1]
    return matched, out[:max_new]


PROMPTS = [[1, 7, 300, 42, 9, 77], [1, 5, 600, 601, 33], [1, 12, 800, 14, 15, 16, 17]]


def greedy_sequences(model, prompts, total):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=total, do_sample=False, eos_token_id=None
                               )[0].tolist() for p in prompts]


@pytest.mark.slow
def test_eval_acceptance_equals_slow_loop(tmp_path):
    from transformers import AutoModelForCausalLM

    from specforge_core.evaluation.accounting import stats_from_cycles
    from specforge_core.evaluation.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    K, M = 3, 24
    seqs = greedy_sequences(model, PROMPTS, M + K)
    alg = make_peagle(PEagleOptions(num_depths=4, num_layers=2, down_sample_ratio=0.9, down_sample_ratio_min=0.5))
    export = overfit_draft(model, seqs, alg, tmp_path, steps=25)  # accepts some drafts, rejects others
    report = evaluate(export, str(TINY), PROMPTS, steps=K, max_new_tokens=M, eos_ids=(), check=True,
                      batch_size=2, device="cpu", dtype="fp32")
    assert report.ok, report.errors
    draft, d2t = load_export(export)
    cycles = []
    for p, pr in zip(PROMPTS, report.prompts, strict=True):
        matched, _ = slow_speculation(model, draft, d2t, p, K, M)
        want = stats_from_cycles(matched, K)
        assert (pr.raw.cycles, pr.raw.tokens, pr.raw.at_least) == (want.cycles, want.tokens, want.at_least)
        cycles += matched
    # masked slots' drafts are accepted and some drafts rejected: the comparison covers both
    assert sum(m >= 2 for m in cycles) > 0 and sum(m < K for m in cycles) > 0


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_exports(tmp_path, capsys):
    """configs/quickstart-peagle.toml as shipped (every step), then ``specforge eval`` on its export
    and ``specforge export`` from its checkpoint: the whole user path, under two minutes on CPU."""
    from safetensors.torch import load_file

    from specforge_core.config import load_config
    from specforge_core.evaluation.evaluate import evaluate
    from specforge_core.export import export_from_checkpoint
    from specforge_core.pipeline import run_pipeline

    root = TINY.parents[2]
    cfg = load_config([root / "configs" / "quickstart-peagle.toml"],
                      overrides=[f"run.output_dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                                 "logging.progress=false"])
    result = run_pipeline(cfg)
    assert result.steps == 100
    losses = [m["loss"] for m in result.history]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert "acc " in capsys.readouterr().out  # the run shows the per-depth accuracies it declares
    exported = load_file(str(result.export_dir / "model.safetensors"))
    assert {"mask_hidden", "embed_tokens.weight", "layers.1.mlp.down_proj.weight", "d2t"} <= set(exported)
    again = export_from_checkpoint(cfg, out_dir=tmp_path / "again")
    for k, t in load_file(str(again / "model.safetensors")).items():
        assert torch.equal(t, exported[k]), k

    report = evaluate(str(result.export_dir), str(cfg.model.target), [str(p) for p in cfg.eval.data],
                      steps=3, max_new_tokens=64, device="cpu", dtype="fp32")
    assert report.ok, report.errors
    assert report.overall.tau > 1.8  # 1.97 measured (an untrained draft: ~1.0)
    assert report.overall.at_least[2] > 0  # the last masked slot's drafts are accepted too


@pytest.mark.parametrize("layers,train_embedding", [(4, True), (1, False)])
def test_plan_counts_the_parameters_the_draft_has(layers, train_embedding):
    from types import SimpleNamespace as NS

    alg, draft, vocab = build(PEagleOptions(num_layers=layers, train_embedding=train_embedding))
    config = NS(model=NS(aux_layers=[2, 4, 5], draft_vocab_size=24), training=NS(dtype="bf16"),
                dataset=NS(max_seq_length=64), eval=NS(steps=9))
    plan = alg.plan(config, HF)
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in draft.parameters() if not p.requires_grad)
    assert (plan.trainable_params, plan.frozen_params) == (trainable, frozen)
    assert [p[1] for p in plan.problems] == ["eval.steps"]  # 9 drafts asked, 8 trained


def test_registered_with_a_one_line_description():
    from specforge_core.registry import get_registry

    comp = get_registry().get("draft_algorithm", "peagle")
    assert comp.description.startswith("P-EAGLE") and "\n" not in comp.description
    assert comp.config_class is PEagleOptions
