"""The optimized draft step (trainer micro-step: LSE-merged TTT attention + fused forward-kl loss)
computes the same loss and gradients as the plain eager reference (dense masks, full softmax,
full logits) of benchmarks/eager_reference.py, on random inputs at small sizes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eager_reference import eager_step_loss  # noqa: E402
from specforge_defaults.loss import ForwardKLLoss, ForwardKLOptions  # noqa: E402
from specforge_llama_eagle3.config import DraftConfig  # noqa: E402
from specforge_llama_eagle3.model import LlamaEagle3Draft  # noqa: E402
from specforge_llama_eagle3.objective import micro_step  # noqa: E402

from specforge_core.training.batch import Batch  # noqa: E402

V, VD, H, K = 96, 40, 32, 4


def optimized_loss(model, batch, head, t2d):
    # the algorithm's micro_step with per-step target logits (no precomputed distribution)
    loss_fn = ForwardKLLoss(ForwardKLOptions(chunk_size=7), precompute=False)
    return micro_step(model.ttt_forward, model.lm_head.weight, loss_fn, batch, head, t2d, K)[0]


def setup(seed, dtype):
    torch.manual_seed(seed)
    cfg = DraftConfig(hidden_size=H, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                      max_position_embeddings=256, vocab_size=V, draft_vocab_size=VD, target_hidden_size=H)
    model = LlamaEagle3Draft(cfg).to(dtype)
    B, T = 2, 19
    lengths = torch.tensor([T, 13])
    real = torch.arange(T)[None] < lengths[:, None]
    batch = Batch(
        input_ids=torch.randint(0, V, (B, T)) * real,
        loss_mask=real & (torch.rand(B, T) < 0.8),
        attention_mask=real,
        aux_hidden=torch.randn(B, T, 3 * H, dtype=dtype) * real[..., None],
        final_hidden=torch.randn(B, T, H, dtype=dtype) * real[..., None],
        target_argmax=torch.randint(0, V, (B, T)) * real,
        lengths=lengths,
    )
    head = torch.randn(VD, H, dtype=dtype) * H**-0.5
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.randperm(V)[:VD]] = True
    return model, batch, head, t2d


def loss_and_grads(fn, model, *args):
    model.zero_grad(set_to_none=True)
    loss = fn(model, *args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention,ckpt,merge", [("eager", False, "loop"), ("sdpa", False, "loop"),
                                                  ("flex", True, "loop"), ("eager", False, "stacked"),
                                                  ("flex", True, "stacked")])
def test_optimized_step_matches_eager_reference_float64(attention, ckpt, merge):
    """``stacked`` is the math of the merge that runs torch.compile'd on GPU, here eager."""
    model, batch, head, t2d = setup(0, torch.float64)
    ref_loss, ref_g = loss_and_grads(lambda m, *a: eager_step_loss(m, *a, K)[0], model, batch, head, t2d)
    model.attention = attention
    model.merge = merge
    model.activation_checkpointing = ckpt  # model.llama-eagle3.activation_checkpointing
    if attention == "sdpa":  # fused CPU kernel assumes right padding: compare only full rows
        batch.attention_mask[:] = True
        batch.lengths[:] = batch.input_ids.shape[1]
        ref_loss, ref_g = loss_and_grads(lambda m, *a: eager_step_loss(m, *a, K)[0], model, batch, head, t2d)
    loss, g = loss_and_grads(optimized_loss, model, batch, head, t2d)
    assert set(g) == set(ref_g) and len(g) > 10
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    # the CPU flash kernel behind "sdpa" rounds a little in fp64 (abs errors ~1e-9)
    tol = dict(rtol=1e-5, atol=1e-7) if attention == "sdpa" else dict(rtol=1e-7, atol=1e-9)
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], **tol, msg=lambda m, n=n: f"grad {n}: {m}")


def test_bf16_step_within_bf16_tolerance_of_fp64_reference():
    model, batch, head, t2d = setup(1, torch.float64)
    ref_loss, ref_g = loss_and_grads(lambda m, *a: eager_step_loss(m, *a, K)[0], model, batch, head, t2d)
    model.to(torch.bfloat16)
    b16 = Batch(batch.input_ids, batch.loss_mask, batch.attention_mask, batch.aux_hidden.bfloat16(),
                batch.final_hidden.bfloat16(), batch.target_argmax, batch.lengths)
    loss, g = loss_and_grads(optimized_loss, model, b16, head.bfloat16(), t2d)
    assert abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) < 2e-2
    for n in ref_g:
        rel = float((g[n].double() - ref_g[n]).norm() / ref_g[n].norm())
        assert rel < 5e-2, f"grad {n}: relative error {rel:.3g}"


def test_chunk_math_matches_softmax_definitions():
    """The compiled-on-CUDA chunk body of forward-kl (loss, agreements, gradient) vs plain formulas."""
    from specforge_defaults.loss import _chunk_math

    d, t = torch.randn(6, 50, dtype=torch.float64) * 3, torch.randn(6, 50, dtype=torch.float64) * 3
    loss, correct, g = _chunk_math(d, t, torch.tensor(0.25, dtype=torch.float64), torch.float64)
    p_t = torch.softmax(t, -1)
    torch.testing.assert_close(loss, -(p_t * torch.log_softmax(d, -1)).sum())
    assert int(correct) == int((d.argmax(-1) == t.argmax(-1)).sum())
    torch.testing.assert_close(g, 0.25 * (torch.softmax(d, -1) - p_t))


def trainer_micro_step_loss(model, batch, head, t2d):
    """The trainer's own micro_step: forward-kl's default prepares the target distribution once."""
    loss_fn = ForwardKLLoss(ForwardKLOptions(chunk_size=7))
    assert loss_fn.precompute
    return micro_step(model.ttt_forward, model.lm_head.weight, loss_fn, batch, head, t2d, K)[0]


@pytest.mark.parametrize("merge", ["loop", "stacked"])
def test_precomputed_targets_path_matches_eager_reference_float64(merge):
    model, batch, head, t2d = setup(2, torch.float64)
    model.merge = merge
    ref_loss, ref_g = loss_and_grads(lambda m, *a: eager_step_loss(m, *a, K)[0], model, batch, head, t2d)
    loss, g = loss_and_grads(trainer_micro_step_loss, model, batch, head, t2d)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-7, atol=1e-9, msg=lambda m, n=n: f"grad {n}: {m}")


def test_fp32_master_weights_under_bf16_autocast():
    """The local strategy's default on GPU: fp32 params, bf16 compute under autocast. The step runs
    in bf16 (no fp32 promotion through the norms), gradients arrive in fp32 and match the fp64
    reference within bf16 tolerance."""
    model, batch, head, t2d = setup(3, torch.float64)
    ref_loss, ref_g = loss_and_grads(lambda m, *a: eager_step_loss(m, *a, K)[0], model, batch, head, t2d)
    model.float()
    model.embed_tokens.to(torch.bfloat16)  # frozen: stored in the compute dtype
    b16 = Batch(batch.input_ids, batch.loss_mask, batch.attention_mask, batch.aux_hidden.bfloat16(),
                batch.final_hidden.bfloat16(), batch.target_argmax, batch.lengths)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.compute_dtype(torch.device("cpu")) == torch.bfloat16
        for hidden in model.ttt_forward(b16.input_ids, b16.aux_hidden, b16.attention_mask, 2):
            seen.append(hidden.dtype)
            assert torch.is_autocast_enabled("cpu")  # the generator leaves the caller's state alone
    assert seen == [torch.bfloat16] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, g = loss_and_grads(trainer_micro_step_loss, model, b16, head.bfloat16(), t2d)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) < 2e-2
    for n in ref_g:
        rel = float((g[n].double() - ref_g[n]).norm() / ref_g[n].norm())
        assert rel < 5e-2, f"grad {n}: relative error {rel:.3g}"
