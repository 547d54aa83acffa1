"""LK losses (Samarin et al., "LK Losses: Direct Acceptance Rate Optimization for Speculative
Decoding", arXiv 2602.23881): train the draft on the acceptance rate itself, not on KL as a proxy.

With ``p`` the target's next-token distribution over its *full* vocabulary and ``q`` the draft's
over the draft vocabulary (zero elsewhere), one speculative token is accepted with probability

    alpha = sum_v min(p_v, q_v)        (= 1 - TV(p, q); tokens outside the draft vocab count as misses)

Two objectives per valid row, both bundled here:

* ``kind = "alpha"``:  -log(alpha). Its gradient is TV's rescaled by 1/alpha, which keeps it
  useful from a random start, where TV's own gradient vanishes.
* ``kind = "hybrid"`` (default): lambda * KL(p~ || q) + (1 - lambda) * (1 - alpha), with p~ the
  target renormalised over the draft vocab and lambda = exp(-eta * mean alpha) (detached; the mean
  over this call's valid rows): mostly KL while the draft accepts little, mostly acceptance later.
  eta = 3 is the authors' published setting.

Gradients w.r.t. the draft logits d (q = softmax(d)), with m_v = [q_v < p_v]:
``d alpha / d d = q * (m - <m, q>)`` and ``d KL / d d = q - p~``. They are computed in the forward
pass chunk by chunk (like forward-kl), so at most one chunk of [rows x draft_vocab] fp32 exists.

The loss needs the target's probability mass outside the draft vocab (p is normalised over the
full vocabulary), hence ``needs_full_vocab``: ``prepare`` reads the whole target lm_head once per
micro-batch for the log-normaliser and keeps log p over the draft vocab for every position.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from specforge_core.components import LossOutput, softcap_logits
from specforge_core.config.fields import in_range, one_of, option, positive


@attrs.define
class LKOptions:
    kind: str = option("hybrid", "LK objective: 'hybrid' (adaptive KL + acceptance) or 'alpha' (-log acceptance)",
                       validator=one_of(("hybrid", "alpha")))
    eta: float = option(3.0, "hybrid: lambda = exp(-eta * mean acceptance); larger hands over to acceptance sooner",
                        validator=in_range(0, 100))
    chunk_size: int = option(4096, "Rows per chunk: at most chunk_size x draft_vocab fp32 values exist at once",
                             validator=positive)


@attrs.frozen
class TargetLogProbs:
    """log p (normalised over the target's full vocab) restricted to the draft vocab, per position."""

    logp: torch.Tensor  # fp32 (fp64 for fp64 inputs) [N, Vd]
    argmax: torch.Tensor  # int64 [N]: argmax over the draft vocab


@torch.no_grad()
def target_log_probs(final_hidden: torch.Tensor, rows: torch.Tensor, full: torch.Tensor, chunk: int,
                     softcap: float | None = None) -> TargetLogProbs:
    """``final_hidden`` [N, H], ``rows`` [Vd, H] (draft-vocab rows of the target head), ``full``
    [V, H] (the whole head); ``softcap`` the target's ``final_logit_softcapping`` (None: none)."""
    f32 = torch.promote_types(final_hidden.dtype, torch.float32)  # fp64 in tests, fp32 otherwise
    logp = torch.empty(final_hidden.shape[0], rows.shape[0], dtype=f32, device=final_hidden.device)
    full, rows = full.to(final_hidden.dtype), rows.to(final_hidden.dtype)  # once, not per chunk
    # the full-vocab logits are [step, V]: keep them within chunk x draft_vocab values too (a
    # 262k-token head at 4096 rows would be 4 GiB of fp32 at once)
    step = max(1, min(chunk, chunk * rows.shape[0] // max(1, full.shape[0])))
    for s in range(0, final_hidden.shape[0], step):
        h = final_hidden[s : s + step]
        lse = torch.logsumexp(softcap_logits((h @ full.T).to(f32), softcap), dim=-1)
        logp[s : s + step] = softcap_logits((h @ rows.T).to(f32), softcap) - lse[:, None]
    return TargetLogProbs(logp=logp, argmax=logp.argmax(dim=-1))


def lk_chunk(d: torch.Tensor, logp: torch.Tensor, kind: str, lam: torch.Tensor | None):
    """Per-row loss [C], acceptance alpha [C] and d loss / d d [C, Vd] for draft logits ``d`` and
    target log-probs ``logp`` (both fp32 [C, Vd]); ``lam`` the hybrid's scalar weight."""
    q = torch.softmax(d, dim=-1)
    p = logp.exp()
    below = (q < p).to(q.dtype)
    alpha = torch.minimum(p, q).sum(-1)
    g_alpha = q * (below - (below * q).sum(-1, keepdim=True))
    if kind == "alpha":
        a = alpha.clamp(min=1e-12)
        return -a.log(), alpha, -g_alpha / a[:, None]
    p_renorm = torch.softmax(logp, dim=-1)  # the target over the draft vocab alone
    kl = (p_renorm * (torch.log_softmax(logp, dim=-1) - torch.log_softmax(d, dim=-1))).sum(-1)
    return lam * kl + (1 - lam) * (1 - alpha), alpha, lam * (q - p_renorm) - (1 - lam) * g_alpha


class _FusedLK(torch.autograd.Function):
    """Draft head GEMM + LK loss over valid rows in chunks; gradients computed in forward."""

    @staticmethod
    def forward(ctx, draft_hidden, draft_head, logp, t_arg, rows, t_rows, kind: str, eta: float, chunk: int):
        with torch.autocast(draft_hidden.device.type, enabled=False):
            f32 = torch.promote_types(draft_hidden.dtype, torch.float32)
            w = draft_head.to(f32)
            lam = None
            if kind == "hybrid":  # lambda from this call's mean acceptance (a first, gradient-free pass)
                with torch.no_grad():
                    acc = torch.zeros((), dtype=f32, device=draft_hidden.device)
                    for s in range(0, rows.numel(), chunk):
                        d = draft_hidden.index_select(0, rows[s : s + chunk]).to(f32) @ w.T
                        acc += torch.minimum(torch.softmax(d, -1), logp.index_select(0, t_rows[s : s + chunk]).exp()
                                             ).sum()
                    lam = torch.exp(-eta * acc / max(rows.numel(), 1))
            grad_h = torch.zeros(draft_hidden.shape, dtype=f32, device=draft_hidden.device)
            grad_w = torch.zeros(w.shape, dtype=f32, device=w.device)
            loss_sum = torch.zeros((), dtype=f32, device=w.device)
            correct = torch.zeros((), dtype=torch.int64, device=w.device)
            for s in range(0, rows.numel(), chunk):
                idx, t_idx = rows[s : s + chunk], t_rows[s : s + chunk]
                h = draft_hidden.index_select(0, idx).to(f32)
                d = h @ w.T
                loss, _, g = lk_chunk(d, logp.index_select(0, t_idx), kind, lam)
                loss_sum += loss.sum()
                correct += (d.argmax(-1) == t_arg.index_select(0, t_idx)).sum()
                grad_h.index_copy_(0, idx, g @ w)
                grad_w += g.T @ h
        ctx.save_for_backward(grad_h.to(draft_hidden.dtype), grad_w.to(draft_head.dtype))
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                None, None, None, None, None, None, None)


class LKLoss:
    """The ``Loss`` component (``specforge_core.components.Loss``) for both LK objectives."""

    needs_full_vocab = True

    def __init__(self, options: LKOptions | None = None):
        self.options = options or LKOptions()

    def prepare(self, final_hidden: torch.Tensor, head: Any) -> TargetLogProbs:
        final_hidden = final_hidden.reshape(-1, final_hidden.shape[-1]).detach()
        return target_log_probs(final_hidden, head.rows, head.full(), self.options.chunk_size,
                                getattr(head, "logit_softcap", None))

    def __call__(self, draft_hidden, draft_head, prepared: TargetLogProbs, target_rows, valid) -> LossOutput:
        if draft_hidden.dim() != 2 or valid.shape != draft_hidden.shape[:1]:
            raise ValueError(f"lk: draft_hidden must be [N, H] and valid [N]; got {tuple(draft_hidden.shape)} "
                             f"and {tuple(valid.shape)}")
        rows = valid.bool().nonzero().squeeze(1)
        t_rows = target_rows.index_select(0, rows)
        loss_sum, correct = _FusedLK.apply(draft_hidden, draft_head, prepared.logp, prepared.argmax, rows, t_rows,
                                           self.options.kind, float(self.options.eta), int(self.options.chunk_size))
        return LossOutput(loss_sum=loss_sum, correct=correct, count=rows.numel() + torch.zeros((), dtype=torch.int64,
                                                                                           device=rows.device))


def make_lk(options: LKOptions | None) -> LKLoss:
    return LKLoss(options)
