"""Exact speculation vs plain greedy (the guard), batched vs one prompt at a time, fast path vs
exact loop, and a draft that memorised one greedy continuation reaching tau = K+1. Real parts: a
tiny random HF target, the hf backend, the trainer, the llama-eagle3 export and its proposer."""

from __future__ import annotations

import pytest
import torch

from specforge_core.config import load_config
from specforge_core.evaluation import evaluate
from specforge_core.evaluation.speculate import speculate_batch
from specforge_core.evaluation.target import TargetModel
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping

VOCAB = 512
K_TRAIN = 4
STEPS_TAU = 4  # eval K for the tau = K+1 test
N_FULL = 1 + 3 * (STEPS_TAU + 1)  # prefill token + 3 full cycles


def make_target(path):
    from specforge_core.testing import make_tiny_model

    model = make_tiny_model(vocab_size=VOCAB)
    with torch.no_grad():  # peaked next-token distributions, like a trained LM's
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A target, one prompt + its greedy continuation, and a draft trained to memorise it."""
    from specforge_core.export import export_draft
    from specforge_core.training.components import create
    from specforge_core.training.trainer import Trainer

    root = tmp_path_factory.mktemp("evalspec")
    target = make_target(root / "target")
    tm = TargetModel(str(target), [2, 4, 5])
    prompt = torch.randint(3, VOCAB, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    cont = tm.greedy(prompt, N_FULL + 6, eos_ids=())  # a little longer than the tau test needs
    ids = torch.tensor(prompt + cont)
    mask = torch.zeros_like(ids, dtype=torch.uint8)
    mask[len(prompt):] = 1
    sample = Sample("memo", ids, mask)

    cfg = load_config(data={
        "run": {"name": "evalspec", "output_dir": str(root / "run"), "seed": 0},
        "model": {"target": str(target), "draft_vocab_size": 128, "llama-eagle3": {"ttt_length": K_TRAIN}},
        "training": {"scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0, "lr": 2e-2},
    })
    backend = create(cfg, "target_backend", cfg, "cpu")
    feats = backend.generate([sample])
    # draft vocab: every token of the sequence plus filler ids (a real, non-identity d2t)
    used = torch.unique(torch.cat([ids, feats[0].target_argmax]))
    rest = torch.tensor([i for i in range(VOCAB) if i not in set(used.tolist())])[: 128 - used.numel()]
    vocab = VocabMapping.from_target_ids(torch.cat([used, rest]), VOCAB)

    trainer = Trainer(cfg, backend.info, vocab, total_steps=300)
    untrained = export_draft(trainer.draft, vocab, root / "untrained")
    perfect = 0
    for _ in range(300):  # many steps at a high lr on one sample, until every TTT step is exact
        m = trainer.train_step([feats])
        perfect = perfect + 1 if all(m[f"acc_{k}"] == 1.0 for k in range(K_TRAIN)) else 0
        if perfect >= 5:
            break
    assert perfect >= 5, f"the draft did not memorise the sample: {m}"
    trained = export_draft(trainer.draft, vocab, root / "trained")
    return {"target": str(target), "tm": tm, "prompt": prompt, "cont": cont,
            "trained": trained, "untrained": untrained}


def prompts_for(s):
    """The memorised prompt, prompts that start mid-continuation (long accepted runs), and random
    prompts (mostly rejected drafts): a mix of accept lengths."""
    p, c = s["prompt"], s["cont"]
    g = torch.Generator().manual_seed(7)
    rand = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11)]
    return [p, p + c[:3], p + c[:10], *rand]


def test_memorised_prompt_reaches_k_plus_one(setup):
    rep = evaluate(setup["trained"], setup["target"], [setup["prompt"]], steps=STEPS_TAU,
                   max_new_tokens=N_FULL, eos_ids=())
    assert rep.ok, rep.errors
    assert rep.overall.cycles == 3 and rep.overall.tokens == N_FULL - 1
    assert rep.tau == STEPS_TAU + 1
    assert rep.rates == [1.0] * STEPS_TAU


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_speculative_output_equals_greedy(setup, steps):
    """The guard: token for token equal to plain greedy decoding of each prompt alone (unbatched,
    no holes in its cache), for several K (5 > the trained TTT length) and budgets that cut the
    last cycle, all prompts in one batch."""
    from specforge_llama_eagle3.proposer import make_proposer

    tm = setup["tm"]
    proposer = make_proposer(setup["trained"], tm, tm.device)
    some_accepted = 0
    prompts = prompts_for(setup)
    for budget in (1, 7, 19):
        results = speculate_batch(prompts, proposer, tm, steps, budget, eos_ids=())
        for prompt, res in zip(prompts, results, strict=True):
            assert res.output == tm.greedy(prompt, budget, eos_ids=())
            assert sum(c for _, c in res.cycles) == budget - 1
            some_accepted += sum(a for a, _ in res.cycles)
    assert some_accepted > 0


def test_batched_equals_one_prompt_at_a_time(setup):
    """Rows of a batch (different prompt lengths, different accept runs, rows finishing early at an
    EOS) count exactly as when each prompt runs alone."""
    prompts = prompts_for(setup)
    eos = [setup["cont"][5]]  # a token the memorised continuation emits: some rows stop early
    kw = dict(steps=3, max_new_tokens=15, eos_ids=eos)
    one = evaluate(setup["trained"], setup["target"], prompts, batch_size=1, **kw)
    many = evaluate(setup["trained"], setup["target"], prompts, batch_size=4, **kw)
    assert one.ok and many.ok
    for a, b in zip(one.prompts, many.prompts, strict=True):
        assert (a.generated, a.stats, a.raw) == (b.generated, b.stats, b.raw)
    assert any(p.generated < 15 for p in one.prompts)  # EOS did cut some rows


def test_guard_reports_a_wrong_verifier(setup):
    """A target whose verification forwards silently corrupt one token must be caught as a mismatch."""
    from specforge_llama_eagle3.proposer import make_proposer

    tm = TargetModel(setup["target"], [2, 4, 5])
    forward_rows = tm.forward_rows

    def corrupt(ids, positions, mask, cache, logits=False):
        out, aux = forward_rows(ids, positions, mask, cache, logits=logits)
        if ids.shape[1] > 1 and mask.shape[2] > ids.shape[1]:  # a verification, not the prefill
            out = out.clone()
            out[0, 0] = (out[0, 0] + 1) % VOCAB
        return out, aux

    tm.forward_rows = corrupt
    res = speculate_batch([setup["prompt"]], make_proposer(setup["trained"], tm, tm.device), tm, 2, 9, ())[0]
    from specforge_core.evaluation.evaluate import first_difference

    assert first_difference(res.output, tm.greedy(setup["prompt"], 9, ())) is not None


@pytest.mark.parametrize("steps", [2, 4])
def test_fast_path_equals_exact_loop(setup, steps):
    prompts = prompts_for(setup)
    kw = dict(steps=steps, max_new_tokens=17, eos_ids=())
    exact = evaluate(setup["trained"], setup["target"], prompts, **kw)
    fast = evaluate(setup["trained"], setup["target"], prompts, fast=True, **kw)
    assert exact.ok
    for e, f in zip(exact.prompts, fast.prompts, strict=True):
        assert (e.stats.cycles, e.stats.tokens, e.stats.at_least) == (f.stats.cycles, f.stats.tokens, f.stats.at_least)
    assert exact.tau == fast.tau and exact.rates == fast.rates
    assert 1.0 < exact.tau < steps + 1  # a mix, not a degenerate case


def test_untrained_draft_scores_lower(setup):
    kw = dict(steps=3, max_new_tokens=16, eos_ids=(), fast=True)
    ps = prompts_for(setup)[:3]
    trained = evaluate(setup["trained"], setup["target"], ps, **kw)
    untrained = evaluate(setup["untrained"], setup["target"], ps, **kw)
    assert untrained.tau < trained.tau
