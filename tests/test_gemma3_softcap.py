"""Gemma 2-style ``final_logit_softcapping`` (Gemma 3 has none): the target distributions the losses
build from ``final_hidden @ head.T`` are the target's own, softcapped as its forward does. Checked
on a tiny in-process Gemma 2 (8 layers, cap 2.0) through the real hf backend and the trainer,
against the logits of transformers' own forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_core.config import load_config
from specforge_core.hfconfig import final_logit_softcap
from specforge_core.training.components import create
from specforge_core.training.trainer import Trainer
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping

ROOT = Path(__file__).resolve().parent.parent
VOCAB, CAP = 512, 2.0


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=16,
                       query_pre_attn_scalar=16, final_logit_softcapping=CAP, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # logits well past the cap, so capping changes the distribution
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(str(path))
    return path, model


def _setup(tmp_path, path):
    cfg = load_config(data={"run": {"name": "t", "output_dir": str(tmp_path / "run"), "seed": 0},
                            "model": {"target": str(path), "draft_vocab_size": 128},
                            # transformers' Gemma 2 has no SDPA path (its attention is softcapped too)
                            "inference": {"hf": {"attn_implementation": "eager"}}})
    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(24, dtype=torch.uint8)
    mask[4:] = 1
    backend = create(cfg, "target_backend", cfg, "cpu")
    feats = backend.generate([Sample("s0", ids, mask)])
    draft_ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:128]
    vocab = VocabMapping.from_target_ids(draft_ids, VOCAB)
    trainer = Trainer(cfg, backend.info, vocab, total_steps=1)
    return ids, feats[0], trainer


def test_the_cap_is_read_from_the_config():
    assert final_logit_softcap({"model_type": "gemma2", "final_logit_softcapping": 30.0}) == 30.0
    gemma3 = json.loads((ROOT / "configs" / "targets" / "gemma3-270m" / "config.json").read_text())
    assert gemma3["final_logit_softcapping"] is None and final_logit_softcap(gemma3) is None
    assert final_logit_softcap({"model_type": "llama"}) is None


def test_forward_kl_and_lk_targets_are_the_softcapped_distribution(tmp_path, gemma2):
    from specforge_defaults.loss import ForwardKLLoss
    from specforge_defaults.loss_lk import LKLoss

    path, model = gemma2
    ids, feats, trainer = _setup(tmp_path, path)
    head = trainer.head
    assert head.logit_softcap == CAP
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()  # transformers caps these itself
    assert logits.abs().max() <= CAP  # ... and they are capped (tanh saturates to the cap in fp32)
    draft = head.draft_ids.cpu()
    final = feats.final_hidden.double()

    # forward-kl: the target's distribution over the draft vocab
    want = torch.softmax(logits[:, draft], -1)
    got = ForwardKLLoss().prepare(final, head).probs
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # LK: log p over the full vocabulary, read at the draft ids
    want_lk = torch.log_softmax(logits, -1)[:, draft]
    got_lk = LKLoss().prepare(final, head).logp
    torch.testing.assert_close(got_lk.double(), want_lk, rtol=1e-4, atol=1e-5)

    # without the cap the same head gives another distribution (what the losses built before)
    head.logit_softcap = None
    raw = ForwardKLLoss().prepare(final, head).probs
    assert (raw.double() - want).abs().max() > 0.05


def test_forward_kl_without_precompute_refuses_a_capped_target(tmp_path, gemma2):
    from specforge_defaults.loss import ForwardKLLoss

    _ids, feats, trainer = _setup(tmp_path, gemma2[0])
    with pytest.raises(ValueError, match="final_logit_softcapping = 2"):
        ForwardKLLoss(precompute=False).prepare(feats.final_hidden, trainer.head)
