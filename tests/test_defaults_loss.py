"""forward-kl: the fused chunked loss against a plain float64 autograd reference, through the loss
contract (``prepare`` once, then a summed loss per prediction group with explicit target rows)."""

from __future__ import annotations

import pytest
import torch
from specforge_defaults.loss import ForwardKLLoss, ForwardKLOptions, fused_forward_kl

N, H, VD = 13, 16, 37


def reference(dh, dw, th, tw, valid, rows=None):
    """Per-position Python loop over full logits, autograd does the gradients: the SUM over valid
    rows (row i taught by target row rows[i])."""
    total = torch.zeros((), dtype=torch.float64)
    correct, count = 0, 0
    for i in range(dh.shape[0]):
        if not valid[i]:
            continue
        d = dw @ dh[i]
        t = tw @ th[i if rows is None else int(rows[i])]
        total = total - (torch.softmax(t, -1) * torch.log_softmax(d, -1)).sum()
        correct += int(torch.argmax(d) == torch.argmax(t))
        count += 1
    return total, correct, count


def run(dh, dw, th, tw, valid, rows=None, chunk=8192, precompute=True):
    """The contract's call order: prepare once, then one summed-loss call."""
    loss = ForwardKLLoss(ForwardKLOptions(chunk_size=chunk), precompute=precompute)
    prepared = loss.prepare(th, tw)
    rows = torch.arange(dh.shape[0]) if rows is None else rows
    return loss(dh, dw, prepared, rows.to(dh.device), valid)


def inputs(dtype=torch.float64, seed=0, p_valid=0.7):
    g = torch.Generator().manual_seed(seed)
    dh = torch.randn(N, H, generator=g, dtype=torch.float64)
    dw = torch.randn(VD, H, generator=g, dtype=torch.float64) * 0.5
    th = torch.randn(N, H, generator=g, dtype=torch.float64)
    tw = torch.randn(VD, H, generator=g, dtype=torch.float64) * 0.5
    valid = torch.rand(N, generator=g) < p_valid
    valid[0] = True
    return [x.to(dtype) for x in (dh, dw, th, tw)] + [valid]


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 100])
@pytest.mark.parametrize("precompute", [True, False])
def test_matches_reference_float64(chunk, precompute):
    dh, dw, th, tw, valid = inputs(seed=chunk + precompute)
    assert 0 < valid.sum() < N  # some invalid positions
    rows = (torch.arange(N) + 2).clamp(max=N - 1)  # each row taught by a later target row
    ref_dh, ref_dw = dh.clone().requires_grad_(), dw.clone().requires_grad_()
    ref_loss, ref_correct, ref_count = reference(ref_dh, ref_dw, th, tw, valid, rows)
    ref_loss.backward()

    dh.requires_grad_()
    dw.requires_grad_()
    out = run(dh, dw, th, tw, valid, rows, chunk=chunk, precompute=precompute)
    out.loss_sum.backward()

    # the fused path computes in fp32 internally, so compare at fp32 precision
    torch.testing.assert_close(out.loss_sum.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert int(out.correct) == ref_correct
    assert int(out.count) == ref_count
    assert dh.grad.dtype == torch.float64 and dw.grad.dtype == torch.float64
    torch.testing.assert_close(dh.grad, ref_dh.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.grad, ref_dw.grad, rtol=1e-4, atol=1e-6)
    # invalid rows get exactly zero gradient
    assert (dh.grad[~valid] == 0).all()


def test_weighted_mean_helper_matches_reference():
    """``fused_forward_kl`` (weighted mean over valid rows) = the summed reference / count."""
    dh, dw, th, tw, valid = inputs(seed=3)
    ref_sum, _, count = reference(dh, dw, th, tw, valid)
    loss, raw, _ = fused_forward_kl(dh, dw, th, tw, valid, weight=0.64, chunk_size=4)
    torch.testing.assert_close(raw.double(), ref_sum / count, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), 0.64 * ref_sum / count, rtol=1e-5, atol=1e-6)


def test_correct_counts_agreements_exactly():
    # target head = draft head and same hidden -> every valid position agrees
    dh, dw, _, _, valid = inputs(torch.float32)
    out = run(dh, dw, dh.clone(), dw.clone(), valid)
    assert int(out.correct) == int(valid.sum()) == int(out.count)
    # identical distributions: the soft CE equals the target entropy, and the gradient is ~0
    p = torch.softmax(dh[valid].double() @ dw.double().T, -1)
    entropy = -(p * p.log()).sum(-1).sum()
    torch.testing.assert_close(out.loss_sum.double(), entropy, rtol=1e-5, atol=1e-5)


def test_grad_output_scaling():
    """backward scales the stored gradients by grad_output (the algorithm's weight / count)."""
    dh, dw, th, tw, valid = inputs(torch.float32)
    dh.requires_grad_()
    (run(dh, dw, th, tw, valid, chunk=3).loss_sum * 0.25).backward()
    g_quarter = dh.grad.clone()
    dh.grad = None
    run(dh, dw, th, tw, valid, chunk=3).loss_sum.backward()
    torch.testing.assert_close(g_quarter, dh.grad * 0.25)


def test_all_invalid_is_zero_without_nan():
    dh, dw, th, tw, valid = inputs(torch.float32)
    valid[:] = False
    dh.requires_grad_()
    dw.requires_grad_()
    out = run(dh, dw, th, tw, valid)
    out.loss_sum.backward()
    assert float(out.loss_sum.detach()) == 0.0
    assert int(out.correct) == 0 and int(out.count) == 0
    assert torch.isfinite(dh.grad).all() and (dh.grad == 0).all() and (dw.grad == 0).all()


def test_bf16_inputs_close_to_fp64_reference():
    dh, dw, th, tw, valid = inputs(torch.float64, seed=7)
    ref_dh, ref_dw = dh.clone().requires_grad_(), dw.clone().requires_grad_()
    ref_loss, *_ = reference(ref_dh, ref_dw, th, tw, valid)
    ref_loss.backward()

    b = [x.to(torch.bfloat16) for x in (dh, dw, th, tw)]
    b[0].requires_grad_()
    b[1].requires_grad_()
    out = run(*b, valid, chunk=4, precompute=False)
    out.loss_sum.backward()
    assert out.loss_sum.dtype == torch.float32
    assert b[0].grad.dtype == torch.bfloat16 and b[1].grad.dtype == torch.bfloat16
    # error comes from rounding the inputs to bf16 (8 bits of mantissa)
    torch.testing.assert_close(out.loss_sum.double(), ref_loss.detach(), rtol=3e-2, atol=3e-1)
    torch.testing.assert_close(b[0].grad.double(), ref_dh.grad, rtol=0.1, atol=5e-2)
    torch.testing.assert_close(b[1].grad.double(), ref_dw.grad, rtol=0.1, atol=5e-2)


def test_peak_logit_memory_is_one_chunk(monkeypatch):
    """No [rows x Vd] matmul larger than one chunk is ever issued (forward and backward)."""
    dh, dw, th, tw, valid = inputs(torch.float32)
    valid[:] = True
    dh.requires_grad_()
    dw.requires_grad_()
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        if out.dim() == 2 and out.shape[1] == VD:
            seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    run(dh, dw, th, tw, valid, chunk=4, precompute=False).loss_sum.backward()
    assert seen and max(seen) <= 4
    assert sum(seen) == 2 * N  # draft and target logits, once per row


def test_shape_errors_are_clear():
    dh, dw, th, tw, valid = inputs(torch.float32)
    with pytest.raises(ValueError, match="valid must be"):
        fused_forward_kl(dh, dw, th, tw, valid[:-1])
    with pytest.raises(ValueError, match="draft_head and target_head"):
        fused_forward_kl(dh, dw, th, tw[:-1], valid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precompute", [True, False])
def test_cuda_bf16_matches_cpu_fp64(precompute):
    dh, dw, th, tw, valid = inputs(torch.float64, seed=11)
    ref_dh, ref_dw = dh.clone().requires_grad_(), dw.clone().requires_grad_()
    ref_loss, ref_correct, _ = reference(ref_dh, ref_dw, th, tw, valid)
    ref_loss.backward()
    b = [x.to("cuda", torch.bfloat16) for x in (dh, dw, th, tw)]
    b[0].requires_grad_()
    b[1].requires_grad_()
    out = run(*b, valid.cuda(), chunk=5, precompute=precompute)
    out.loss_sum.backward()
    assert out.loss_sum.device.type == "cuda" and b[0].grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss_sum.double().cpu(), ref_loss.detach(), rtol=3e-2, atol=3e-1)
    torch.testing.assert_close(b[0].grad.double().cpu(), ref_dh.grad, rtol=0.1, atol=5e-2)
    torch.testing.assert_close(b[1].grad.double().cpu(), ref_dw.grad, rtol=0.1, atol=5e-2)


@pytest.mark.parametrize("precompute", [True, False])
def test_weighted_groups_equal_the_per_group_calls(precompute):
    """The contract's fast path (one differentiable total over the groups, valid rows and weights
    given up front) has the per-group calls' value, sums and gradients (fp64), under an upstream
    scale."""
    torch.manual_seed(0)
    N, H, V, K = 48, 16, 40, 4
    head = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    hiddens = [torch.randn(N, H, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    final, target_head = torch.randn(N + K + 1, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    weights = torch.rand(K, dtype=torch.float64)
    valids = [torch.rand(N, generator=torch.Generator().manual_seed(k)) > 0.3 for k in range(K)]

    def run(fast: bool):
        loss = ForwardKLLoss(ForwardKLOptions(chunk_size=16), precompute=precompute)
        prepared = loss.prepare(final, target_head)
        groups = loss.weighted_groups(prepared, torch.stack(valids), weights) if fast else None
        total, outs = None, []
        for k in range(K):
            rows, x = torch.arange(N) + k + 1, hiddens[k] * 1.5
            if fast:
                out = groups.add(k, x, head, rows)
            else:
                out = loss(x, head, prepared, rows, valids[k])
                part = out.loss_sum * weights[k]
                total = part if total is None else total + part
            outs.append(out)
        total = groups.finish() if fast else total
        (2.5 * total).backward()
        grads = [head.grad.clone()] + [h.grad.clone() for h in hiddens]
        head.grad = None
        for h in hiddens:
            h.grad = None
        return total.detach(), grads, outs

    want_total, want_grads, want_outs = run(False)
    total, grads, outs = run(True)
    assert torch.allclose(total, want_total, rtol=1e-13)
    for g, w in zip(grads, want_grads, strict=True):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)
    for o, w in zip(outs, want_outs, strict=True):
        assert torch.allclose(o.loss_sum, w.loss_sum.detach(), rtol=1e-13)
        assert int(o.correct) == int(w.correct) and int(o.count) == int(w.count)
    assert want_grads[0].abs().sum() > 0 and not outs[0].loss_sum.requires_grad


def test_weighted_groups_refuses_bad_shapes_and_a_group_added_twice():
    loss = ForwardKLLoss(ForwardKLOptions(chunk_size=16))
    N, H, V = 8, 4, 6
    prepared = loss.prepare(torch.randn(N + 1, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"valid \[G, N\] and weights \[G\]"):
        loss.weighted_groups(prepared, torch.ones(2, N, dtype=torch.bool), torch.ones(3))
    groups = loss.weighted_groups(prepared, torch.ones(2, N, dtype=torch.bool), torch.ones(2, dtype=torch.float64))
    head, x = torch.randn(V, H, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64)
    out = groups.add(0, x, head, torch.arange(N) + 1)
    assert int(out.count) == N
    with pytest.raises(ValueError, match="group 0 added twice"):
        groups.add(0, x, head, torch.arange(N) + 1)
    with pytest.raises(ValueError, match="group 2 added twice or outside 0..1"):
        groups.add(2, x, head, torch.arange(N) + 1)
