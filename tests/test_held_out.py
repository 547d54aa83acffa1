"""Held-out acceptance during training (``training.eval_every``, ``specforge_core.run.held_out``):
the estimate equals a per-sample recomputation by hand (draft argmax vs target argmax of every
TTT step), it leaves the weights alone, and the held-out samples never reach a training step."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from specforge_llama_eagle3.objective import acceptance_length, learned

from specforge_core.config import load_config
from specforge_core.pipeline import run_pipeline
from specforge_core.run import held_out
from specforge_core.training.batch import collate
from specforge_core.training.components import create
from specforge_core.training.trainer import Trainer
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping

ROOT = Path(__file__).resolve().parents[1]
VOCAB, K = 512, 3


def test_split_is_seeded_disjoint_and_keeps_one_for_training():
    samples = [Sample(f"s{i}", torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1], dtype=torch.uint8))
               for i in range(20)]
    train, held = held_out.split_held_out(samples, 5, seed=3)
    again, held2 = held_out.split_held_out(samples, 5, seed=3)
    ids = lambda xs: [s.sample_id for s in xs]  # noqa: E731
    assert ids(held) == ids(held2) and ids(train) == ids(again)
    assert len(held) == 5 and not set(ids(held)) & set(ids(train)) and len(train) + len(held) == 20
    assert ids(train) == sorted(ids(train), key=lambda s: int(s[1:]))  # training order untouched
    assert ids(held_out.split_held_out(samples, 5, seed=4)[1]) != ids(held)
    train, held = held_out.split_held_out(samples[:3], 10, seed=0)
    assert len(train) == 1 and len(held) == 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_training_trainer import peaked_target

    path = peaked_target(tmp_path_factory.mktemp("target"), VOCAB)
    cfg = load_config(data={
        "run": {"name": "h", "output_dir": str(tmp_path_factory.mktemp("run")), "seed": 0},
        "model": {"target": str(path), "draft_vocab_size": 128, "llama-eagle3": {"ttt_length": K}},
        "training": {"scheduler": "constant", "warmup_ratio": 0.0, "lr": 3e-3},
    })
    backend = create(cfg, "target_backend", cfg, "cpu")
    samples = []
    for i, T in enumerate((9, 23, 14, 30, 18, 26)):
        g = torch.Generator().manual_seed(i)
        mask = torch.zeros(T, dtype=torch.uint8)
        mask[3:] = 1
        samples.append(Sample(f"s{i}", torch.randint(3, VOCAB, (T,), generator=g), mask))
    feats = backend.generate(samples)
    # a draft vocab missing some target top tokens: out-of-vocab positions count as misses
    used = torch.unique(torch.cat([f.target_argmax for f in feats]))
    keep = used[: max(1, int(0.7 * used.numel()))]
    rest = torch.tensor([i for i in range(VOCAB) if i not in set(used.tolist())])[: 128 - keep.numel()]
    vocab = VocabMapping.from_target_ids(torch.cat([keep, rest]), VOCAB)
    return cfg, backend.info, feats, vocab


def slow_accuracies(trainer: Trainer, feats, vocab) -> list[float]:
    """Per sample, alone: the draft's TTT steps, its argmax over the draft vocab mapped to target
    ids, compared with the target's argmax of the token each step predicts, over the learned rows."""
    correct, base = [0] * K, [0] * K
    with torch.no_grad():
        for f in feats:
            batch = collate([f], "cpu", torch.float32)
            steps = trainer.draft.ttt_forward(batch.input_ids, batch.aux_hidden, batch.attention_mask, K)
            T = batch.input_ids.shape[1]
            for k, h in enumerate(steps):
                guess = vocab.draft_to_target_ids[(h @ trainer.draft.lm_head.weight.T).argmax(-1)][0]
                rows = learned(batch, k)[0]
                for t in range(T):
                    if rows[t]:
                        base[k] += 1
                        correct[k] += int(guess[t] == batch.target_argmax[0, t + k + 1])
    return [c / b for c, b in zip(correct, base, strict=True)]


def test_estimate_equals_per_sample_recomputation_and_leaves_weights_alone(setup):
    cfg, info, feats, vocab = setup
    trainer = Trainer(cfg, info, vocab, total_steps=10)
    for _ in range(3):  # trained weights, not the initial ones
        trainer.train_step([feats[:2]])
    before = {n: p.detach().clone() for n, p in trainer.draft.named_parameters()}
    held = feats[2:]
    m = held_out.held_out_metrics(trainer, held, micro_batch_size=3)  # two micro-batches of unequal lengths
    want = slow_accuracies(trainer, held, vocab)
    assert [m[f"acc_{k}"] for k in range(K)] == pytest.approx(want, abs=1e-9)
    assert m["accept_len"] == pytest.approx(acceptance_length(want), abs=1e-9)
    assert 0 < want[0] < 1  # neither trivially right nor trivially wrong: the comparison bites
    assert trainer.model.training and trainer.step == 3
    for n, p in trainer.draft.named_parameters():
        assert torch.equal(p, before[n]), n
    # the micro-batch split does not change the estimate (statistics are summed, not averaged)
    one = held_out.held_out_metrics(trainer, held, micro_batch_size=1)
    assert one["accept_len"] == pytest.approx(m["accept_len"], abs=1e-9)


def _config(tmp_path, **training):
    over = [f"run.output_dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}",
            "dataset.max_samples=24", "logging.progress=false", "training.max_steps=4",
            "training.num_epochs=1", "training.save_every=0"]
    over += [f"training.{k}={v}" for k, v in training.items()]
    return load_config([ROOT / "configs" / "quickstart.toml"], overrides=over)


@pytest.mark.slow
def test_run_logs_held_out_estimate_and_never_trains_on_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    trained: list[str] = []
    evaluated: list[list[str]] = []
    step = Trainer.train_step

    def spy_step(self, micro):
        trained.extend(f.sample_id for m in micro for f in m)
        return step(self, micro)

    metrics = held_out.held_out_metrics

    def spy_eval(trainer, feats, micro_batch_size, counted=True):
        evaluated.append([f.sample_id for f in feats])
        return metrics(trainer, feats, micro_batch_size, counted)

    monkeypatch.setattr(Trainer, "train_step", spy_step)
    monkeypatch.setattr(held_out, "held_out_metrics", spy_eval)
    out = io.StringIO()
    cfg = _config(tmp_path, eval_every=3, eval_samples=5)
    result = run_pipeline(cfg, console=Console(file=out, width=300))

    assert len(evaluated) == 2  # step 3 and the last (4)
    assert len(set(evaluated[0])) == 5 and evaluated[0] == evaluated[1]
    assert trained and not set(trained) & set(evaluated[0])
    assert result.accounting["skipped: held out for evaluation (training.eval_every)"] == 5
    h = result.history
    assert "held_out/accept_len" not in h[0] and "held_out/accept_len" not in h[1]
    assert h[2]["held_out/accept_len"] >= 1.0 and "held_out/acc_0" in h[3]
    text = out.getvalue()
    assert "held-out step 3: acc " in text and "held-out step 4: " in text and "since step 3)" in text


@pytest.mark.slow
def test_greedy_chain_estimate_equals_specforge_eval_of_the_final_export(tmp_path, monkeypatch):
    """``training.eval_chain_prompts``: the chain tau logged at the last step equals ``evaluate``
    (greedy-guarded) of the run's own final export on the same held-out prompts."""
    from specforge_core.evaluation.evaluate import evaluate

    monkeypatch.chdir(ROOT)
    seen: list[list[list[int]]] = []
    call = held_out.Chain.__call__

    def spy(self):
        seen.append(self.prompts)
        return call(self)

    monkeypatch.setattr(held_out.Chain, "__call__", spy)
    cfg = load_config([ROOT / "configs" / "quickstart.toml"], overrides=[
        f"run.output_dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.max_samples=24",
        "logging.progress=false", "training.max_steps=4", "training.eval_every=4", "training.eval_samples=3",
        "training.eval_chain_prompts=2", "eval.steps=3", "eval.max_new_tokens=16"])
    result = run_pipeline(cfg, console=Console(file=io.StringIO(), width=300))
    assert len(seen) == 1 and len(seen[0]) == 2 and all(len(p) > 0 for p in seen[0])
    logged = result.history[-1]["held_out/chain_accept_len"]
    report = evaluate(result.export_dir, str(cfg.model.target), seen[0], steps=3, max_new_tokens=16, check=True)
    assert all(r.mismatch is None for r in report.prompts)
    assert logged == pytest.approx(report.overall.tau, abs=1e-12)
    assert logged > 1.0, logged  # some drafts accepted: the comparison is not 1.0 == 1.0


def test_ray_plan_shares_every_held_out_sample_once_over_the_ranks():
    """``pipeline.ray.held_out.HeldOutPlan``: round robin over the ranks, each held-out sample in
    exactly one counted share; a rank left without one takes part with an uncounted copy; the
    engines' prompts point past the usable samples, with seqs apart from the training stream's."""
    from specforge_core.pipeline.ray.held_out import HeldOutPlan

    def s(i, n):
        return Sample(f"s{i}", torch.arange(n), torch.ones(n, dtype=torch.uint8))

    usable, held = [s(i, 5 + i) for i in range(7)], [s(100 + j, 3 + j) for j in range(3)]
    for world in (1, 2, 3, 5):
        plan = HeldOutPlan(usable, held, world, [[1, 2]])
        assert plan.samples == usable + held
        counted = [i for idx, _, c in plan.shares if c for i in idx]
        assert sorted(counted) == [7, 8, 9]  # each held-out sample once, after the usable ones
        assert [len(idx) for idx, _, _ in plan.shares] == [max(1, len(range(r, 3, world))) for r in range(world)]
        assert [c for _, _, c in plan.shares] == [r < 3 for r in range(world)]
        p = plan.prompts()
        assert sorted(p.seq.tolist()) == list(range(-p.n, 0))  # unique, negative
        assert [plan.samples[i].num_tokens for i in p.index.tolist()] == p.num_tokens.tolist()
        assert len(plan.keys("run")) == p.n and len(set(plan.keys("run"))) == p.n
        share = plan.rank(world - 1, "ref")
        assert share.results == ["ref"] and share.chain_prompts == [[1, 2]]
        assert plan.rank(0).results is None  # the feature cache: no engine results
