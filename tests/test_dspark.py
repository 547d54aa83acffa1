"""DSpark plugin: the objective (block loss through the Markov-corrected head + the confidence BCE)
and its gradients against a slow plain implementation written here (one block, one slot at a time),
the export layout vLLM's ``Qwen3DSparkModel`` loads, and ``specforge eval``'s acceptance against a
slow speculation loop (sequential Markov drafting)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from specforge_defaults.loss import ForwardKLLoss
from specforge_dspark.export import load_export
from specforge_dspark.plugin import DSparkOptions, make_dspark
from test_dflash import HF, TINY, _features, _overfit_draft, random_batch, slow_block

from specforge_core.components import ObjectiveContext, TargetHead
from specforge_core.types import TargetInfo
from specforge_core.vocab import VocabMapping


def build(opts: DSparkOptions, vd=24, seed=0):
    torch.manual_seed(seed)
    alg = make_dspark(opts)
    vocab = VocabMapping.from_target_ids(torch.randperm(40)[:vd], 40)
    info = TargetInfo(model_path="-", hf_config=HF, aux_layer_ids=[2, 4, 5], hidden_size=32, vocab_size=40,
                      num_hidden_layers=8)
    draft = alg.build(info, vocab)
    with torch.no_grad():  # non-trivial norms and a non-zero Markov bias, so a mix-up shows
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        draft.markov_head.markov_w2.weight.normal_(0, 0.5)
    return alg, draft, vocab


def slow_objective(draft, batch, head_rows, t2d, stride, gamma, alpha, lengths=()):
    """sum_k w_k / D_k * sum over valid (row, anchor) of [soft CE + alpha * BCE(conf, sum min(p, q))]."""
    N = draft.config.block_size
    sd = dict(draft.named_parameters())
    w1, w2 = sd["markov_head.markov_w1.weight"], sd["markov_head.markov_w2.weight"]
    sums, counts = [0.0] * N, [0] * N
    for b in range(batch.input_ids.shape[0]):
        n = int(batch.lengths[b])
        for a in range(1, n - 1, stride):
            L = lengths[(b + (a - 1) // stride) % len(lengths)] if lengths else N
            out = None
            for k in range(L):
                t = a + k + 1  # slot k predicts x[t]
                if t >= n or not batch.loss_mask[b, t] or not t2d[batch.target_argmax[b, t - 1]]:
                    continue
                out = slow_block(draft, int(batch.input_ids[b, a]), a, batch.aux_hidden[b], L) if out is None else out
                m = w1[int(batch.input_ids[b, t - 1])]
                logits = out[k] @ draft.lm_head.weight.T + m @ w2.T
                p = torch.softmax(batch.final_hidden[b, t - 1] @ head_rows.T, -1)
                term = -(p * torch.log_softmax(logits, -1)).sum()
                if draft.confidence_head is not None:
                    c_star = torch.minimum(p, torch.softmax(logits, -1)).sum().detach()
                    feat = torch.cat([out[k], m]) if draft.heads.confidence_head_with_markov else out[k]
                    z = feat @ sd["confidence_head.proj.weight"][0] + sd["confidence_head.proj.bias"][0]
                    term = term + alpha * -(c_star * F.logsigmoid(z) + (1 - c_star) * F.logsigmoid(-z))
                sums[k] = sums[k] + term
                counts[k] += 1
    w = [math.exp(-k / gamma) if gamma > 0 else 1.0 for k in range(N)]
    return sum(w[k] * sums[k] / max(counts[k], 1) for k in range(N)), counts


@pytest.mark.parametrize("block_size,stride,gamma,alpha,conf,with_markov,lengths", [
    (4, 1, 4.0, 1.0, True, True, ()),
    (5, 2, 0.0, 0.5, True, False, ()),
    (4, 1, 2.0, 1.0, False, False, ()),
    (6, 1, 2.0, 1.0, True, True, (3, 6, 1)),  # blocks of mixed lengths
])
def test_objective_equals_slow_reference(block_size, stride, gamma, alpha, conf, with_markov, lengths):
    opts = DSparkOptions(block_size=block_size, num_layers=2, anchor_stride=stride, loss_decay=gamma, markov_rank=6,
                         confidence_head=conf, confidence_head_with_markov=with_markov, confidence_alpha=alpha,
                         train_block_lengths=list(lengths))
    alg, draft, vocab = build(opts)
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(gen, [13, 9])
    rows = torch.randn(vocab.draft_vocab_size, 32, generator=gen)
    head = TargetHead(rows=rows, t2d=vocab.t2d, draft_ids=vocab.draft_to_target_ids)
    denom = alg.count_targets(batch, head)
    loss, stats = alg.objective(draft, batch, ObjectiveContext(loss=ForwardKLLoss(), head=head, denominators=denom))
    loss.backward()
    fast = {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}
    draft.zero_grad()

    ref, counts = slow_objective(draft, batch, rows, vocab.t2d, stride, gamma, alpha, lengths)
    ref.backward()
    assert denom.tolist() == [float(c) for c in counts] and sum(counts) > 10
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in draft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert draft.markov_head.markov_w1.weight.grad.abs().sum() > 0  # the Markov head is trained
    if conf:
        assert draft.confidence_head.proj.weight.grad.abs().sum() > 0
    m = alg.summarize(stats)
    assert m["valid_tokens"] == sum(counts) and 0 <= m["accept_rate"] <= 1 and "acc_1" in m


def test_export_layout_and_roundtrip(tmp_path):
    from specforge_core.export import write_export

    alg, draft, vocab = build(DSparkOptions(block_size=4, num_layers=2, markov_rank=6))
    config, tensors = alg.export(draft, vocab)
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == 4
    assert config["markov_rank"] == 6 and config["sample_from_anchor"] is True
    assert config["enable_confidence_head"] is True and config["confidence_head_with_markov"] is True
    assert config["dflash_config"] == {"mask_token_id": 0, "target_layer_ids": [1, 3, 4]}
    # the names vLLM's Qwen3DSparkForCausalLM.load_weights reads (prefixed "model." except lm_head/d2t)
    assert tensors["markov_head.markov_w1.weight"].shape == (40, 6)  # target vocab
    assert tensors["markov_head.markov_w2.weight"].shape == (24, 6)  # draft vocab
    assert tensors["confidence_head.proj.weight"].shape == (1, 32 + 6)
    assert tensors["confidence_head.proj.weight"].dtype == torch.float32 and tensors["confidence_head.proj.bias"].shape == (1,)
    write_export(config, tensors, tmp_path / "export")
    from specforge_vllm.eval_engine import speculative_method

    assert speculative_method(tmp_path / "export") == "dspark"  # not dflash: the config has dflash_config too
    loaded, d2t_ids = load_export(tmp_path / "export")
    assert torch.equal(d2t_ids, vocab.draft_to_target_ids) and loaded.aux_layer_ids == [2, 4, 5]
    for n, t in loaded.state_dict().items():
        torch.testing.assert_close(t, tensors[n].float(), msg=n)


def _slow_speculation(model, draft, d2t, prompt, k, max_new):
    """Greedy DSpark speculation with full target recomputation: a k-slot ``slow_block`` and a
    sequential Markov pass; matched drafts per cycle."""
    w1, w2 = draft.markov_head.markov_w1.weight, draft.markov_head.markov_w2.weight
    with torch.no_grad():
        out = [int(model(torch.tensor([prompt])).logits[0, -1].argmax())]
        matched = []
        while len(out) < max_new:
            seq = prompt + out
            n = len(seq) - 1
            aux, _ = _features(model, seq, draft.aux_layer_ids)
            h = slow_block(draft, seq[-1], n, aux[:n].float(), k)
            drafts, prev = [], seq[-1]
            for i in range(k):
                prev = int(d2t[(h[i] @ draft.lm_head.weight.T + w1[prev] @ w2.T).argmax()])
                drafts.append(prev)
            nxt = model(torch.tensor([seq + drafts])).logits[0, n:].argmax(-1).tolist()
            m = 0
            while m < k and drafts[m] == nxt[m]:
                m += 1
            matched.append(m)
            out += nxt[: m + 1]
    return matched, out[:max_new]


def greedy_setup(M=24, K=3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    prompts = [[1, 7, 300, 42, 9, 77], [1, 5, 600, 601, 33], [1, 12, 800, 14, 15, 16, 17]]
    with torch.no_grad():
        seqs = [model.generate(torch.tensor([p]), max_new_tokens=M + K + 1, do_sample=False, eos_token_id=None
                               )[0].tolist() for p in prompts]
    return model, prompts, seqs


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [3, 5])  # K = 3 = block_size, and K < block_size
def test_eval_acceptance_equals_slow_loop(tmp_path, block_size):
    from specforge_core.evaluation.accounting import stats_from_cycles
    from specforge_core.evaluation.evaluate import evaluate

    K, M = 3, 24
    model, prompts, seqs = greedy_setup(M, K)
    alg = make_dspark(DSparkOptions(block_size=block_size, num_layers=1, anchor_stride=1, loss_decay=0.0,
                                    markov_rank=16, train_block_lengths=[K]))
    export = _overfit_draft(model, seqs, alg, tmp_path)
    report = evaluate(export, str(TINY), prompts, steps=K, max_new_tokens=M, eos_ids=(), check=True,
                      batch_size=2, device="cpu", dtype="fp32")
    assert report.ok, report.errors
    draft, d2t = load_export(export)
    assert draft.markov_head.markov_w2.weight.abs().max() > 0  # trained away from its zero start
    total = 0
    for p, pr in zip(prompts, report.prompts, strict=True):
        matched, out = _slow_speculation(model, draft, d2t, p, K, M)
        want = stats_from_cycles(matched, K)
        assert (pr.raw.cycles, pr.raw.tokens, pr.raw.at_least) == (want.cycles, want.tokens, want.at_least)
        assert pr.generated == len(out) and pr.mismatch is None
        total += sum(matched)
    assert report.overall.at_least[1] > 0 and total > len(prompts) * 3  # drafts beyond the first are accepted


@pytest.mark.slow
def test_quickstart_dspark_trains_exports_evaluates(tmp_path, monkeypatch):
    """configs/quickstart-dspark.toml, a few steps: trains, exports vLLM's layout, evaluates."""
    from safetensors.torch import load_file

    from specforge_core.config import load_config
    from specforge_core.evaluation.evaluate import evaluate
    from specforge_core.pipeline import run_pipeline

    root = TINY.parents[2]
    monkeypatch.chdir(root)
    cfg = load_config([root / "configs" / "quickstart-dspark.toml"], overrides=[
        "training.max_steps=4", f"run.output_dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.max_samples=32", "logging.progress=false"])
    result = run_pipeline(cfg)
    assert result.steps == 4
    tensors = load_file(str(result.export_dir / "model.safetensors"))
    assert {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight"} <= set(tensors)
    report = evaluate(str(result.export_dir), str(TINY), [[1, 7, 300, 42, 9, 77]], steps=3, max_new_tokens=8,
                      eos_ids=(), device="cpu", dtype="fp32")
    assert report.ok, report.errors
