"""TTT attention: the mask pattern, and the LSE-merged implementation vs the dense definition."""

import pytest
import torch
from specforge_llama_eagle3.attention import (
    dense_ttt_attention,
    sdpa_causal_attention_with_lse,
    ttt_attention,
    ttt_mask,
)


def test_ttt_mask_pattern_T4_k2():
    # Columns: step 0 keys s=0..3 | step 1 keys s=0..3 | step 2 keys s=0..3.
    expected = torch.tensor([
        [1, 0, 0, 0,  1, 0, 0, 0,  1, 0, 0, 0],
        [1, 1, 0, 0,  0, 1, 0, 0,  0, 1, 0, 0],
        [1, 1, 1, 0,  0, 0, 1, 0,  0, 0, 1, 0],
        [1, 1, 1, 1,  0, 0, 0, 1,  0, 0, 0, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(ttt_mask(4, 2)[0], expected)


def test_ttt_mask_hides_padded_step0_keys_but_keeps_self():
    valid = torch.tensor([[True, True, False, False]])
    m = ttt_mask(4, 1, valid)[0]
    expected = torch.tensor([
        [1, 0, 0, 0,  1, 0, 0, 0],
        [1, 1, 0, 0,  0, 1, 0, 0],
        [1, 1, 1, 0,  0, 0, 1, 0],  # padded query: real keys + itself (finite, carries no loss)
        [1, 1, 0, 1,  0, 0, 0, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(m, expected)


def _inputs(B, Hq, Hkv, T, D, k, dtype=torch.float64):
    def t(h):
        return torch.randn(B, h, T, D, dtype=dtype, requires_grad=True)

    q, k0, v0 = t(Hq), t(Hkv), t(Hkv)
    kd = [t(Hkv) for _ in range(k)]
    vd = [t(Hkv) for _ in range(k)]
    return q, k0, v0, kd, vd


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_lse_merge_matches_dense_outputs_and_grads(k):
    B, Hq, Hkv, T, D = 2, 4, 2, 13, 16
    q, k0, v0, kd, vd = _inputs(B, Hq, Hkv, T, D, k)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 9:] = False  # right padding in the second row
    scale = D ** -0.5
    leaves = [q, k0, v0, *kd, *vd]

    out = ttt_attention(q, k0, v0, kd, vd, valid, scale)
    ref = dense_ttt_attention(q, k0, v0, kd, vd, valid, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(ref, leaves, g)
    for name, a, b in zip(["q", "k0", "v0"] + [f"kd{i}" for i in range(k)] + [f"vd{i}" for i in range(k)],
                          grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"grad {n}: {m}")


def test_lse_merge_fp32_close_to_dense():
    q, k0, v0, kd, vd = _inputs(1, 4, 2, 32, 16, 3, dtype=torch.float32)
    out = ttt_attention(q, k0, v0, kd, vd, None, 0.25)
    ref = dense_ttt_attention(q, k0, v0, kd, vd, None, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 3])
def test_sdpa_causal_part_matches_dense_on_real_rows(k):
    B, Hq, Hkv, T, D = 2, 4, 2, 16, 16
    q, k0, v0, kd, vd = _inputs(B, Hq, Hkv, T, D, k, dtype=torch.float32)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 11:] = False
    leaves = [q, k0, v0, *kd, *vd]
    out = ttt_attention(q, k0, v0, kd, vd, valid, 0.25, causal=sdpa_causal_attention_with_lse)
    ref = dense_ttt_attention(q, k0, v0, kd, vd, valid, 0.25)
    g = torch.randn_like(out) * valid[:, None, :, None]  # loss only on real rows
    torch.testing.assert_close(out * valid[:, None, :, None], ref * valid[:, None, :, None], rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
