"""The trainer on real parts: a tiny random HF target, the hf backend, the llama-eagle3 draft."""

from __future__ import annotations

import pytest
import torch
from specforge_llama_eagle3.objective import acceptance_length

from specforge_core.config import load_config
from specforge_core.training.components import create
from specforge_core.training.trainer import Trainer
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping

VOCAB = 512


def peaked_target(path, vocab_size=VOCAB):
    """A tiny real target saved at ``path`` whose next-token distributions are peaked, like a
    trained LM's (lm_head x 5)."""
    from specforge_core.testing import make_tiny_model

    model = make_tiny_model(vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    model.save_pretrained(str(path))
    return path


def memorise(trainer: Trainer, feats, K: int, steps: int = 300) -> tuple[dict, dict]:
    """Train on one batch until every TTT step agrees >= 0.99 (or ``steps`` run out); the first and
    the last step's metrics."""
    first = m = None
    for _ in range(steps):
        m = trainer.train_step([feats])
        first = first or m
        if all(m[f"acc_{k}"] >= 0.99 for k in range(K)):
            break
    return first, m


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return peaked_target(tmp_path_factory.mktemp("target"))


def make_config(tmp_path, target, ttt_length=3, **training):
    training = {
        "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0, "lr": 3e-3, **training,
    }
    data = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"target": str(target), "draft_vocab_size": 128, "llama-eagle3": {"ttt_length": ttt_length}},
        "training": training,
    }
    return load_config(data=data)


def one_sample(T=24, seed=0, prompt=4) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (T,), generator=g)
    mask = torch.zeros(T, dtype=torch.uint8)
    mask[prompt:] = 1  # a "prompt", then the "answer"
    return Sample(f"s{seed}", ids, mask)


def vocab_covering(feats, size=128) -> VocabMapping:
    """A draft vocab holding every target top token of ``feats`` (so all positions count), padded
    with other ids: a real, non-identity mapping."""
    used = torch.unique(torch.cat([f.target_argmax for f in feats]))
    rest = torch.tensor([i for i in range(VOCAB) if i not in set(used.tolist())])
    pad = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(0))[: size - used.numel()]]
    return VocabMapping.from_target_ids(torch.cat([used, pad]), VOCAB)


def test_acceptance_length():
    assert acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert acceptance_length([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert acceptance_length([0.0, 1.0]) == 1.0


def test_one_sample_overfit_every_ttt_step(tmp_path, target_dir):
    """Memorising one conversation drives EVERY TTT step to ~100% agreement: only possible if the
    draft's step-k inputs, the aligned targets and the valid mask agree with each other."""
    cfg = make_config(tmp_path, target_dir, lr=1e-2)
    sample = one_sample()
    backend = create(cfg, "target_backend", cfg, "cpu")
    feats = backend.generate([sample])
    vocab = vocab_covering(feats)
    trainer = Trainer(cfg, backend.info, vocab, total_steps=300)
    K = cfg.options("model", "llama-eagle3").ttt_length
    first, m = memorise(trainer, feats, K)
    # some positions must be valid at every step for the check to mean anything
    assert m["valid_tokens"] >= 10
    assert [m[f"acc_{k}"] for k in range(K)] == pytest.approx([1.0] * K, abs=0.01), m
    # soft-label CE keeps the target's entropy, so it falls but not to zero
    assert m["loss"] < first["loss"]
    assert m["accept_len"] == pytest.approx(1 + K, abs=0.05)


def test_gradient_accumulation_matches_token_weighted_reference(tmp_path, target_dir):
    """Two micro-batches accumulate the gradient of the step's token-weighted objective: per TTT
    step, the summed soft cross-entropy of both samples over their total valid tokens (computed
    here densely, by hand), weighted 0.8**k."""
    cfg = make_config(tmp_path, target_dir, lr=1e-3)
    samples = [one_sample(T=16, seed=1), one_sample(T=20, seed=2)]
    backend = create(cfg, "target_backend", cfg, "cpu")
    feats = backend.generate(samples)
    vocab = vocab_covering(feats)

    a = Trainer(cfg, backend.info, vocab, total_steps=10)
    b = Trainer(cfg, backend.info, vocab, total_steps=10)
    ma = a.train_step([[feats[0]], [feats[1]]])
    # train_step leaves the accumulated gradients in place (computed at the initial weights);
    # rebuild them by hand on the identically initialised b.
    ga = {n: p.grad.clone() for n, p in a.model.named_parameters() if p.grad is not None}
    assert ga
    from specforge_llama_eagle3.objective import align_step

    from specforge_core.training.batch import collate

    b.optimizer.zero_grad()
    K = cfg.options("model", "llama-eagle3").ttt_length
    sums = [0.0] * K
    counts = [0] * K
    for f in feats:
        batch = collate([f], b.device, b.dtype)
        steps = b.draft.ttt_forward(batch.input_ids, batch.aux_hidden, batch.attention_mask, K)
        for k, h in enumerate(steps):
            th, valid = align_step(batch, k, b.t2d)
            d = torch.log_softmax(h @ b.draft.lm_head.weight.T, -1)
            p = torch.softmax(th @ b.target_head.T, -1)
            ce = -(p * d).sum(-1)
            sums[k] = sums[k] + (ce * valid).sum()
            counts[k] += int(valid.sum())
    total = sum(0.8**k * sums[k] / counts[k] for k in range(K))
    total.backward()
    for n, p in b.model.named_parameters():
        if n in ga:
            torch.testing.assert_close(p.grad, ga[n], rtol=1e-4, atol=1e-6)
    assert ma["loss"] == pytest.approx(float(total.detach()), rel=1e-5)  # the logged loss is the optimised one
    assert ma["valid_tokens"] == counts[0]
