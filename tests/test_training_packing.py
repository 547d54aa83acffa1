"""Packing (issue 17): documents end to end in fixed-length rows train exactly like the same
documents padded one per row."""

from __future__ import annotations

import pytest
import torch
from specforge_llama_eagle3.config import DraftConfig
from specforge_llama_eagle3.model import LlamaEagle3Draft
from test_training_normalisation import _info, grads, make_config
from test_training_normalisation import setup as normalisation_setup  # noqa: F401, F811 (a fixture)

from specforge_core.training.batch import collate
from specforge_core.training.packing import assign_rows, pack
from specforge_core.training.trainer import Trainer
from specforge_core.types import TargetFeatures

K = 4
H, V, VD = 32, 256, 64


def _draft() -> LlamaEagle3Draft:
    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=H, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                      max_position_embeddings=256, vocab_size=V, draft_vocab_size=VD, target_hidden_size=H)
    m = LlamaEagle3Draft(cfg, attention="eager", compile="off")
    with torch.no_grad():  # larger-than-default weights so every term matters numerically
        for p in m.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return m.double().eval()


def _doc(n: int, seed: int) -> TargetFeatures:
    g = torch.Generator().manual_seed(seed)
    return TargetFeatures(
        sample_id=f"d{seed}", input_ids=torch.randint(0, V, (n,), generator=g),
        loss_mask=torch.rand(n, generator=g) > 0.3,
        aux_hidden=torch.randn(n, 3 * H, generator=g, dtype=torch.float64),
        final_hidden=torch.randn(n, H, generator=g, dtype=torch.float64),
        target_argmax=torch.randint(0, V, (n,), generator=g))


def test_rows_hold_every_sample_once_and_fit():
    lengths = [5, 3, 7, 2, 8, 1, 4]
    rows = assign_rows(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == 4  # first-fit decreasing reaches the bound ceil(30 / 8) here


def test_packed_batch_places_each_document_and_its_positions():
    docs = [_doc(n, s) for s, n in enumerate([5, 3, 7, 2])]
    b = pack(docs, 8, dtype=torch.float64)
    assert b.input_ids.shape == (3, 8) and b.num_tokens == 17
    for r in range(3):
        for d in b.doc_ids[r].unique().tolist():
            if d < 0:
                continue
            at = (b.doc_ids[r] == d).nonzero().squeeze(1)
            n = at.numel()
            src = next(f for f in docs if f.num_tokens == n)
            assert torch.equal(b.input_ids[r, at], src.input_ids)
            assert torch.equal(b.aux_hidden[r, at], src.aux_hidden)
            assert torch.equal(b.position_ids[r, at], torch.arange(n))


def test_packed_ttt_forward_equals_one_document_per_row():
    """Every output that can carry loss (step k, position t with t+k+1 inside the document) is
    the same packed as alone in its own padded row."""
    draft = _draft()
    docs = [_doc(n, s) for s, n in enumerate([9, 4, 6, 3])]
    packed = pack(docs, 16, dtype=torch.float64)
    single = collate(docs, dtype=torch.float64)
    out_p = list(draft.ttt_forward(packed.input_ids, packed.aux_hidden, packed.attention_mask, K,
                                   position_ids=packed.position_ids, doc_ids=packed.doc_ids))
    out_s = list(draft.ttt_forward(single.input_ids, single.aux_hidden, single.attention_mask, K))
    checked = 0
    for i, f in enumerate(docs):
        n = f.num_tokens
        for row in range(packed.input_ids.shape[0]):
            starts = [t for t in range(16) if packed.position_ids[row, t] == 0 and packed.doc_ids[row, t] >= 0]
            for s0 in starts:
                if s0 + n <= 16 and torch.equal(packed.input_ids[row, s0:s0 + n], f.input_ids):
                    for k in range(K):
                        m = n - k - 1  # positions t < n-k-1 read tokens inside the document
                        if m > 0:
                            torch.testing.assert_close(out_p[k][row, s0:s0 + m], out_s[k][i, :m])
                            checked += 1
    assert checked >= len(docs)


def test_packed_training_step_equals_the_padded_one(normalisation_setup, tmp_path):  # noqa: F811
    """The trainer with ``training.pack_tokens``: same step loss, valid tokens and gradients as
    padding every sample to the longest, on the same documents (real tiny target, hf features)."""
    target, feats, vocab = normalisation_setup

    def step(pack_tokens):
        cfg = make_config(tmp_path, target)
        cfg.dataset.max_seq_length = 40
        cfg.training.pack_tokens = pack_tokens
        trainer = Trainer(cfg, _info(target), vocab, total_steps=4)
        return trainer.train_step([list(feats)]), grads(trainer)

    m_pad, g_pad = step(0)
    m_pack, g_pack = step(40)  # lengths 9, 23, 14, 30 -> two rows of 40 (30+9, 23+14)
    assert m_pack["valid_tokens"] == m_pad["valid_tokens"]
    assert m_pack["loss"] == pytest.approx(m_pad["loss"], rel=1e-6)
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-5, atol=1e-7)


def test_packing_is_refused_below_the_longest_sample(normalisation_setup, tmp_path):  # noqa: F811
    target, _, vocab = normalisation_setup
    cfg = make_config(tmp_path, target)
    cfg.training.pack_tokens = 64  # dataset.max_seq_length is 2048
    with pytest.raises(ValueError, match="pack_tokens"):
        Trainer(cfg, _info(target), vocab, total_steps=1)


def test_pack_step_gives_every_micro_batch_the_same_shape():
    from specforge_core.training.packing import pack_step

    docs = [_doc(n, s) for s, n in enumerate([5, 3, 7, 2, 8, 1, 4])]
    batches = pack_step(docs, 8, rows_per_micro=3, dtype=torch.float64)
    assert [tuple(b.input_ids.shape) for b in batches] == [(3, 8), (3, 8)]  # 4 rows -> 3 + (1 + 2 empty)
    assert sum(b.num_tokens for b in batches) == 30
    assert int((batches[-1].doc_ids >= 0).sum()) == batches[-1].num_tokens


def test_fill_rows_carries_what_does_not_fit_and_places_the_oldest_first():
    from specforge_core.training.packing import fill_rows

    rows, left = fill_rows([5, 3, 7, 2, 8, 1, 4], 8, n_rows=2)
    placed = sorted(i for r in rows for i in r)
    assert sorted(placed + left) == list(range(7)) and all(sum([5, 3, 7, 2, 8, 1, 4][i] for i in r) <= 8
                                                           for r in rows)
    assert sum([5, 3, 7, 2, 8, 1, 4][i] for i in placed) == 16  # both rows full: no padding at all
    # a sample that has waited goes before longer new ones
    rows, left = fill_rows([6, 7, 3], 8, n_rows=1, age=[0, 0, 2])
    assert rows == [[2]] and left == [0, 1]  # by length alone 7 would have taken the row


def test_token_budget_steps_equal_the_padded_ones(normalisation_setup, tmp_path):  # noqa: F811
    """Token-budget packing (one row of 40 per step, the rest carried to the next step): each
    step's loss, valid tokens and gradients equal padding the same documents, and every sample is
    trained exactly once."""
    from specforge_core.training.packing import TokenBudgetPacker

    target, feats, vocab = normalisation_setup  # lengths 9, 23, 14, 30

    def trainer(pack_tokens):
        cfg = make_config(tmp_path, target)
        cfg.dataset.max_seq_length = 40
        cfg.training.pack_tokens = pack_tokens
        return Trainer(cfg, _info(target), vocab, total_steps=4)

    packer = TokenBudgetPacker(row_tokens=40, rows_per_micro=1, n_micro=1)
    seen = []
    for new in (list(feats), []):
        batches = packer.step(new, dtype=torch.float32)
        assert [tuple(b.input_ids.shape) for b in batches] == [(1, 40)]
        ids = {f.sample_id for f in feats if any(
            torch.equal(b.input_ids[0, s:s + f.num_tokens], f.input_ids) for b in batches for s in range(40))}
        docs = [f for f in feats if f.sample_id in ids]
        seen += [f.sample_id for f in docs]
        assert sum(f.num_tokens for f in docs) == batches[0].num_tokens
        tp, tr = trainer(40), trainer(0)
        m_pack, m_pad = tp.train_step(batches), tr.train_step([docs])
        assert m_pack["valid_tokens"] == m_pad["valid_tokens"]
        assert m_pack["loss"] == pytest.approx(m_pad["loss"], rel=1e-6)
        g_pack, g_pad = grads(tp), grads(tr)
        for name in g_pad:
            torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-5, atol=1e-7)
    assert sorted(seen) == sorted(f.sample_id for f in feats) and not packer.pending


def test_pack_into_a_fixed_row_count_when_the_samples_fit():
    """``pack(rows=n)`` (a token-budget micro-batch on a Ray rank) keeps n rows even when fewer
    would do, and falls back to as many rows as needed when the samples do not fit n."""
    feats = [_doc(n, seed=i) for i, n in enumerate([30, 20, 10])]
    b = pack(feats, 64, rows=3)
    assert tuple(b.input_ids.shape) == (3, 64) and int(b.num_tokens) == 60
    assert [int(x) for x in b.lengths] == [60, 0, 0]  # first fit: one full row, two empty ones
    assert tuple(pack(feats, 64).input_ids.shape) == (1, 64)  # as few rows as needed
    tight = pack(feats, 32, rows=1)  # 60 tokens cannot fit one row of 32: rows as needed
    assert tight.input_ids.shape[0] == 2 and int(tight.num_tokens) == 60
