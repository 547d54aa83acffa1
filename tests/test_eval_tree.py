"""Tree drafts and temperature > 0 in the engine-free evaluator.

Real parts: a tiny random HF target, a llama-eagle3 export (random weights with peaked heads), its
proposer. References computed another way: a slow plain loop (full target recompute, no cache,
no batching) verifying the proposer's trees; exact enumeration of the target's distribution for
the sampling test; SafeAILab/EAGLE's own ``EaModel.eagenerate`` for the EAGLE-3 tree check
(``eagle_reference.py``; runs where a checkout of SafeAILab/EAGLE is given).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from specforge_core.evaluation import evaluate
from specforge_core.evaluation.speculate import Sampling, speculate_batch
from specforge_core.evaluation.target import TargetModel
from specforge_core.evaluation.tree import DraftTree, TreeSpec, ancestor_mask, expected_accepted, walk_greedy

V = 32  # small vocabulary: a random draft's top-k hits the target's token often enough


def make_pair(root: Path, vocab: int = V) -> tuple[str, str]:
    from specforge_core.export import export_draft
    from specforge_core.registry import get_registry
    from specforge_core.target import target_info
    from specforge_core.testing import make_tiny_model
    from specforge_core.vocab import VocabMapping

    model = make_tiny_model(vocab_size=vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked next-token distributions, like a trained LM's
    model.save_pretrained(str(root / "target"))
    alg = get_registry().create("draft_algorithm", "llama-eagle3")
    v = VocabMapping.from_target_ids(torch.arange(vocab), vocab)
    torch.manual_seed(0)
    draft = alg.build(target_info(str(root / "target"), (2, 4, 5)), v)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
        draft.lm_head.weight.mul_(4.0)
        draft.embed_tokens.weight.copy_(model.get_input_embeddings().weight)
    export_draft(draft, v, root / "draft", alg)
    return str(root / "target"), str(root / "draft")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, draft = make_pair(tmp_path_factory.mktemp("evaltree"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, V, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(4)]
    return target, draft, prompts


def proposer_for(target: str, draft: str):
    from specforge_core.evaluation.proposers import load_proposer
    from specforge_core.target import resolve_aux_layers

    tm = TargetModel(target, [])
    prop = load_proposer(draft, tm, tm.device)
    tm.aux_layer_ids = resolve_aux_layers(prop.aux_layers, tm.num_layers)
    return tm, prop


# ------------------------------------------------------------------------------ pure tree logic
def test_tree_shapes_masks_and_walks():
    t = DraftTree([5, 6, 7, 8], [0, 0, 1, 3])  # root -> 5 -> 7 -> 8, root -> 6
    assert t.depths() == [0, 1, 1, 2, 3]
    m = ancestor_mask(t)
    assert m[4].tolist() == [True, True, False, True, True] and m[2].tolist() == [True, False, True, False, False]
    argmax = [5, 7, 0, 1, 9]  # root wants 5 (node 1), node 1 wants 7 (node 3), node 3 wants 1 (no such child)
    assert walk_greedy(t, argmax) == ([1, 3], 1)
    assert walk_greedy(t, [6, 0, 4, 0, 0]) == ([2], 4)
    probs = torch.zeros(5, 10, dtype=torch.float64)
    probs[0, 5], probs[0, 6], probs[0, 1] = 0.5, 0.25, 0.25
    probs[1, 7], probs[1, 2] = 0.5, 0.5
    probs[3, 8], probs[3, 1] = 0.5, 0.5
    # E = p(5) (1 + p(7) (1 + p(8))) + p(6) = 0.5 * (1 + 0.5 * 1.5) + 0.25
    assert expected_accepted(t, probs) == pytest.approx(0.5 * 1.75 + 0.25)
    with pytest.raises(ValueError, match="parent"):
        DraftTree([1, 2], [0, 2])
    assert TreeSpec.parse("topk=8,depth=6,tokens=64") == TreeSpec(8, 6, 64)
    for bad in ("topk=8,depth=6", "topk=8,depth=6,tokens=x", "width=3,depth=2,tokens=4", "topk=2,depth=2,tokens=8"):
        with pytest.raises(ValueError, match="tree"):
            TreeSpec.parse(bad)


# ------------------------------------------------------------------------------ greedy trees
@pytest.mark.parametrize("tree", ["topk=4,depth=3,tokens=10", "topk=8,depth=4,tokens=24", "topk=3,depth=5,tokens=12"])
def test_tree_output_equals_greedy(pair, tree):
    target, draft, prompts = pair
    r = evaluate(draft, target, prompts, max_new_tokens=24, eos_ids=[], batch_size=3, tree=tree)
    assert r.ok, r.errors
    assert r.steps == TreeSpec.parse(tree).depth and r.raw.cycles > 0


def test_chain_is_the_topk1_tree(pair):
    target, draft, prompts = pair
    chain = evaluate(draft, target, prompts, steps=3, max_new_tokens=20, eos_ids=[])
    tree = evaluate(draft, target, prompts, max_new_tokens=20, eos_ids=[], tree="topk=1,depth=3,tokens=4")
    assert [p.raw for p in chain.prompts] == [p.raw for p in tree.prompts]


def plain_tree_loop(tm: TargetModel, prop, prompt: list[int], spec: TreeSpec, max_new: int) -> list[int]:
    """Slow reference verifier: per cycle the target recomputes prompt + output + the tree from
    scratch (no cache, one row), with an explicit 4-D mask, and the accepted path is found by
    comparing every root-to-leaf path with the target's argmax, as EAGLE's evaluate_posterior does."""
    model = tm.model
    out = [int(model(torch.tensor([prompt])).logits[0, -1].argmax())]
    prop.begin([prompt])
    seq = prompt + out
    feats = tm.forward(seq[:-1])[1]
    prop.observe([seq[1:]], [feats])
    accepted = []
    while len(out) < max_new:
        tokens, parents = prop.propose_tree(spec.topk, spec.depth, spec.tokens)[0]
        tree = DraftTree(tokens, parents)
        n = len(seq)
        ids = torch.tensor([seq + tokens])
        mask = torch.ones(n + len(tokens), n + len(tokens), dtype=torch.bool).tril()
        mask[n - 1:, n - 1:] = ancestor_mask(tree)
        pos = torch.tensor([list(range(n)) + [n - 1 + d for d in tree.depths()[1:]]])
        o = model(input_ids=ids, position_ids=pos, attention_mask=mask[None, None], output_hidden_states=True)
        argmax = o.logits[0, n - 1:].argmax(-1).tolist()
        best = []
        for leaf in range(1, tree.size):  # every root-to-node path, longest accepted prefix wins
            path, node = [], leaf
            while node:
                path.insert(0, node)
                node = tree.parents[node - 1]
            good = []
            for i, node in enumerate(path):
                want = argmax[0 if i == 0 else path[i - 1]]
                if tokens[node - 1] != want:
                    break
                good.append(node)
            best = good if len(good) > len(best) else best
        bonus = argmax[best[-1] if best else 0]
        new = [tokens[i - 1] for i in best] + [bonus]
        accepted.append(len(best))
        aux = torch.cat([o.hidden_states[i][0] for i in tm.aux_layer_ids], dim=-1)
        rows = [n - 1] + [n - 1 + i for i in best]
        out += new
        seq += new
        prop.observe([new], [aux[rows]])
    return accepted


def test_tree_counts_equal_a_plain_tree_loop(pair):
    target, draft, prompts = pair
    spec = TreeSpec(8, 4, 32)
    tm, prop = proposer_for(target, draft)
    batched = speculate_batch(prompts, prop, tm, 3, 30, (), spec)
    for p, res in zip(prompts, batched, strict=True):
        _, prop1 = proposer_for(target, draft)
        slow = plain_tree_loop(tm, prop1, p, spec, 30)
        assert res.matched == slow[: len(res.matched)]
    counts = [m for res in batched for m in res.matched]
    # a random draft gets paths of length 0 and 1 here; deeper paths: the EAGLE check below, run on a
    # trained draft (docs/evaluation.md)
    assert 0 < counts.count(0) < len(counts), counts


# ------------------------------------------------------------------------------ sampling
def chisquare_p(obs: list[float], exp: list[float]) -> float:
    """p-value of Pearson's chi-square test (upper tail of chi2 with len - 1 dof)."""
    o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_sampled_tokens_follow_the_target_distribution(pair):
    """Speculative sampling must not change what is generated: the first 3 tokens of many sampled
    runs (prefill token + one tree cycle) against the target's exact 3-token distribution,
    chi-square at a fixed seed (power: 1200 samples over the ~30 most likely sequences)."""
    target, draft, prompts = pair
    tm, prop = proposer_for(target, draft)
    T, prompt, n = 1.0, prompts[0], 1200
    runs = speculate_batch([prompt] * n, prop, tm, 2, 3, (), TreeSpec(3, 2, 6), Sampling(T, seed=7))
    seen: dict[tuple[int, ...], int] = {}
    for r in runs:
        seen[tuple(r.output[:3])] = seen.get(tuple(r.output[:3]), 0) + 1
    # exact P(x1 x2 x3) = p(x1) p(x2 | x1) p(x3 | x1 x2), over all V**3 sequences
    with torch.no_grad():
        p1 = torch.softmax(tm.model(torch.tensor([prompt])).logits[0, -1].double() / T, -1)
        x12 = torch.tensor([[a] for a in range(V)])
        p2 = torch.softmax(tm.model(torch.cat([torch.tensor([prompt] * V), x12], 1)).logits[:, -1].double() / T, -1)
        pairs = torch.tensor([[a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(tm.model(torch.cat([torch.tensor([prompt] * V * V), pairs], 1)).logits[:, -1].double() / T, -1)
    exact = (p1[:, None, None] * p2[:, :, None] * p3.view(V, V, V)).flatten()
    top = exact.argsort(descending=True)
    keep = [int(i) for i in top if exact[i] * n >= 5]  # cells with enough expected counts
    key = [(i // (V * V), (i // V) % V, i % V) for i in keep]
    obs = [seen.get(k, 0) for k in key] + [n - sum(seen.get(k, 0) for k in key)]
    exp = [float(exact[i]) * n for i in keep] + [n * (1 - float(exact[keep].sum()))]
    assert len(keep) >= 10
    assert chisquare_p(obs, exp) > 1e-3
    # the test has power: a sampler that drops the tree's draft tokens' mass by 30% fails it
    biased = exp.copy()
    biased[0] *= 0.7
    biased[-1] += exp[0] * 0.3
    assert chisquare_p(exp, biased) < 1e-3 or chisquare_p(obs, biased) < 1e-3


def test_expected_acceptance_matches_the_sampled_mean(pair):
    """The exact per-cycle expectation (from the target's distributions) and the sampled
    acceptance agree within their statistical error over many cycles."""
    target, draft, prompts = pair
    for tree in (None, "topk=4,depth=3,tokens=10"):
        r = evaluate(draft, target, prompts * 6, steps=3, max_new_tokens=40, eos_ids=[], tree=tree,
                     temperature=0.7, seed=1)
        acc = [m for p in r.prompts for m in [p.raw.tokens - p.raw.cycles]]
        cycles = r.raw.cycles
        sampled = sum(acc) / cycles
        expected = r.extra["expected_tau"] - 1
        # per-cycle accepted count has variance <= depth^2 / 4; 4 sigma
        assert abs(sampled - expected) < 4 * (r.steps / 2) / cycles ** 0.5, (sampled, expected, cycles)
        assert r.ok  # sampled runs are not compared with greedy decoding


def test_sampling_runs_from_the_cli_settings(pair, tmp_path):
    from specforge_core.evaluation.settings import EvalSettings

    target, draft, prompts = pair
    with pytest.raises(ValueError, match="--fast"):
        EvalSettings(draft=draft, target=target, prompts=prompts, fast=True, temperature=0.7)
    with pytest.raises(ValueError, match="temperature"):
        EvalSettings(draft=draft, target=target, prompts=prompts, temperature=-1)
    s = EvalSettings(draft=draft, target=target, prompts=prompts, tree="topk=2,depth=2,tokens=4")
    assert s.tree == TreeSpec(2, 2, 4) and s.depth == 2


# ------------------------------------------------------------------------------ EAGLE's own client
EAGLE_SRC = os.environ.get("SPECFORGE_EAGLE_SRC", "")


@pytest.mark.slow
@pytest.mark.skipif(not (EAGLE_SRC and Path(EAGLE_SRC, "eagle", "model", "ea_model.py").is_file()),
                    reason="set SPECFORGE_EAGLE_SRC to a checkout of SafeAILab/EAGLE (docs/evaluation.md)")
def test_tree_counts_equal_eagle_eagenerate(pair, tmp_path):
    """SafeAILab/EAGLE's EaModel.eagenerate (EAGLE-3, greedy) with the same tree settings accepts
    the same number of drafts as our evaluator in every cycle of every prompt."""
    from eagle_reference import eagle_accept_lengths

    target, draft, prompts = pair
    spec = TreeSpec(4, 4, 14)
    ref = eagle_accept_lengths(EAGLE_SRC, target, draft, prompts, spec.topk, spec.depth, spec.tokens, 30, tmp_path)
    tm, prop = proposer_for(target, draft)
    ours = speculate_batch(prompts, prop, tm, 3, 30, (), spec)
    for r, o in zip(ref, ours, strict=True):
        assert o.matched == r["accepted"][: len(o.matched)]
        assert o.output == r["output"][: len(o.output)]


def test_speedup_estimate_combines_measured_costs(pair):
    target, draft, prompts = pair
    r = evaluate(draft, target, prompts, max_new_tokens=12, eos_ids=[], tree="topk=2,depth=2,tokens=4",
                 speedup=True, concurrency=[1, 2])
    rows = r.extra["speedup"]["rows"]
    assert [x["concurrency"] for x in rows] == [1, 2] and rows[0]["verify_tokens"] == 4
    for x in rows:
        assert x["target_1"] > 0 and x["draft"] > 0 and x["target_verify"] > 0
        plain = x["concurrency"] / x["target_1"]
        assert x["speedup"] == pytest.approx(x["concurrency"] * r.tau / (x["draft"] + x["target_verify"]) / plain)


def test_advice_ranks_settings_with_serving_flags(pair):
    from specforge_core.evaluation.advice import advise
    from specforge_core.evaluation.settings import EvalSettings

    target, draft, prompts = pair
    base = EvalSettings(draft=draft, target=target, prompts=prompts, max_new_tokens=10, eos_ids=[], concurrency=[1, 2])
    rows = advise(base, [(2, None), (0, "topk=2,depth=2,tokens=4")])
    assert [r["speedup"][1] for r in rows] == sorted((r["speedup"][1] for r in rows), reverse=True)
    by = {r["setting"]: r for r in rows}
    assert by["chain K=2"]["flags"]["sglang"].endswith("--speculative-num-steps 2 --speculative-eagle-topk 1 "
                                              "--speculative-num-draft-tokens 3")
    assert '"num_speculative_tokens": 2' in by["chain K=2"]["flags"]["vllm"]
    assert "--speculative-eagle-topk 2" in by["tree topk=2,depth=2,tokens=4"]["flags"]["sglang"]
    assert by["tree topk=2,depth=2,tokens=4"]["flags"]["vllm"] is None  # vLLM serves EAGLE-3 chains only
