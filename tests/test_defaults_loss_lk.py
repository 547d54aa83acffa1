"""LK losses: the fused, chunked component against a plain dense formula differentiated by autograd."""

from __future__ import annotations

import pytest
import torch
from specforge_defaults.loss_lk import LKLoss, LKOptions

from specforge_core.components import TargetHead

V, VD, H, N = 50, 20, 16, 12


def reference(kind, eta, draft_hidden, draft_head, final_hidden, full_head, draft_ids, target_rows, valid):
    """Straight from the definitions: p over the full vocab, alpha = sum over the draft vocab of
    min(p, q); hybrid lambda from the mean alpha of the valid rows (no gradient through it)."""
    p_full = torch.softmax(final_hidden @ full_head.T, -1)[target_rows]  # [N, V]
    p = p_full[:, draft_ids]  # [N, VD], not renormalised
    q = torch.softmax(draft_hidden @ draft_head.T, -1)
    alpha = torch.minimum(p, q).sum(-1)
    if kind == "alpha":
        per_row = -alpha.log()
    else:
        p_t = p / p.sum(-1, keepdim=True)
        kl = (p_t * (p_t.log() - q.log())).sum(-1)
        lam = torch.exp(-eta * alpha[valid].detach().mean())
        per_row = lam * kl + (1 - lam) * (1 - alpha)
    return per_row[valid].sum()


@pytest.mark.parametrize("kind", ["alpha", "hybrid"])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_lk_loss_and_gradients_equal_the_dense_formula(kind, chunk):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(V, H, generator=g, dtype=torch.float64)
    draft_ids = torch.randperm(V, generator=g)[:VD]
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[draft_ids] = True
    final_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    draft_hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    draft_head = torch.randn(VD, H, generator=g, dtype=torch.float64, requires_grad=True)
    target_rows = torch.roll(torch.arange(N), -1)  # row i taught by position i+1, like a TTT step
    valid = torch.rand(N, generator=g) > 0.3

    head = TargetHead(rows=full[draft_ids], t2d=t2d, draft_ids=draft_ids, full_loader=lambda: full)
    loss = LKLoss(LKOptions(kind=kind, eta=3.0, chunk_size=chunk))
    out = loss(draft_hidden, draft_head, loss.prepare(final_hidden, head), target_rows, valid)
    out.loss_sum.backward()
    got = (out.loss_sum.detach(), draft_hidden.grad.clone(), draft_head.grad.clone())

    dh = draft_hidden.detach().clone().requires_grad_()
    dw = draft_head.detach().clone().requires_grad_()
    ref = reference(kind, 3.0, dh, dw, final_hidden, full, draft_ids, target_rows, valid)
    ref.backward()
    torch.testing.assert_close(got[0], ref.detach())
    torch.testing.assert_close(got[1], dh.grad)
    torch.testing.assert_close(got[2], dw.grad)
    assert int(out.count) == int(valid.sum())
    # agreements: draft argmax vs the target's argmax over the draft vocab
    t_arg = (final_hidden @ full[draft_ids].T)[target_rows].argmax(-1)
    d_arg = (draft_hidden @ draft_head.T).argmax(-1)
    assert int(out.correct) == int(((t_arg == d_arg) & valid).sum())


def test_target_mass_outside_the_draft_vocab_lowers_acceptance():
    """A draft equal to the target renormalised over the draft vocab accepts exactly the target's
    in-vocab mass, which is what the full-vocab head is for."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(V, H, generator=g, dtype=torch.float64)
    draft_ids = torch.arange(VD)
    head = TargetHead(rows=full[:VD], t2d=torch.arange(V) < VD, draft_ids=draft_ids, full_loader=lambda: full)
    final_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    loss = LKLoss(LKOptions(kind="alpha"))
    prepared = loss.prepare(final_hidden, head)
    in_vocab_mass = torch.softmax(final_hidden @ full.T, -1)[:, :VD].sum(-1)
    # draft hidden/head that reproduce the target's draft-vocab logits exactly
    out = loss(final_hidden, full[:VD].clone(), prepared, torch.arange(N), torch.ones(N, dtype=torch.bool))
    torch.testing.assert_close(out.loss_sum, -in_vocab_mass.log().sum())
