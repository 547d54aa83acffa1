"""EAGLE-3's training objective: the training-time-test (TTT) unroll, the step-k alignment of draft
outputs to target positions, step weights and the token-weighted normalisation.

Alignment. The draft's step-k output at position t has consumed token x_{t+k+1} (and, through its
hidden state, everything up to it), so it predicts x_{t+k+2}. The target's distribution over that
token is its lm_head applied to its final hidden state at position t+k+1. Hence, for step k:

    target row[t] = t+k+1                              (of the same sample)
    learned[t]    = (t+k+2 < length)                   # the predicted token exists
                    & loss_mask[t+k+2]                 # ... and is an assistant token we learn
    valid[t]      = learned[t] & t2d[target_argmax[t+k+1]]   # ... and the target's top token is
                                                             #     in the draft vocab (loss rows)

Our step-k mask is the mask of the *predicted* token x_{t+k+2}; the peers (SpecForge, EAGLE) use
loss_mask[t+k] (docs/training.md, "Which positions carry loss").

Normalisation (issue 17, item 3). Step k's summed loss is divided by the number of valid rows of
step k in the whole optimizer step (all micro-batches, all ranks: ``ObjectiveContext.denominators``,
gathered by the trainer from ``count_targets`` before the step), then weighted by decay**k. So the
objective is ``sum_k decay**k * mean over the step's valid rows of step k`` and does not change with
how the step's samples are split into micro-batches or ranks.

Metrics (issue 17, item 4). ``acc_k`` = draft argmax == target argmax over the *learned* rows:
rows whose target argmax lies outside the draft vocab count as misses (the draft can never propose
that token; serving counts them the same way). ``acc_k_invocab`` divides by the in-vocab rows only.
``accept_len`` is simulated from ``acc_k``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch

from specforge_core.components import LossOutput, TargetHead, capability


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``out[:, t] = x[:, t+n]`` along dim 1, zero-filled past the end."""
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


def learned(batch: Any, k: int) -> torch.Tensor:
    """bool [B, T]: step-k positions whose predicted token x_{t+k+2} exists and is learned (and, in
    a packed row, belongs to the same document as position t: no target across documents)."""
    T = batch.input_ids.shape[1]
    pos = torch.arange(T, device=batch.input_ids.device)
    in_range = (pos[None, :] + k + 2) < batch.lengths[:, None]
    out = in_range & shift_left(batch.loss_mask, k + 2)
    doc_ids = batch.doc_ids
    if doc_ids is not None:  # documents are contiguous: same doc at t and t+k+2 covers the span
        out &= shift_left(doc_ids + 1, k + 2) == doc_ids + 1
    return out


def in_draft_vocab(batch: Any, k: int, t2d: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the target's argmax at t+k+1 is in the draft vocab."""
    argmax = shift_left(batch.target_argmax, k + 1)
    return t2d.to(argmax.device)[argmax]


def align_valid(batch: Any, k: int, t2d: torch.Tensor) -> torch.Tensor:
    """``valid`` bool [B, T] of TTT step ``k`` (the rows that carry loss)."""
    return learned(batch, k) & in_draft_vocab(batch, k, t2d)


def align_step(batch: Any, k: int, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target_hidden [B, T, H], valid [B, T])`` of step ``k``: the target's final hidden state
    aligned to each draft position (a plain reference for tests and the eager benchmark)."""
    return shift_left(batch.final_hidden, k + 1), align_valid(batch, k, t2d)


def target_rows(batch: Any, k: int) -> torch.Tensor:
    """int64 [B*T]: the flattened ``final_hidden`` row (b*T + t+k+1) that teaches each draft row
    at step ``k`` (clamped inside the batch; only read where valid, which stays in the sample)."""
    n = batch.input_ids.numel()
    rows = torch.arange(n, device=batch.input_ids.device) + (k + 1)
    return rows.clamp_(max=n - 1)


def step_masks(batch: Any, t2d: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(learned, valid)`` bool [K, B, T] of all K steps at once: ``learned[k]`` and
    ``align_valid(batch, k)`` above, in a handful of kernels instead of ~20 per step (at short T the
    per-step masks' launches sat exposed on the GPU's critical path: issue 15's 2048-token gap)."""
    B, T = batch.input_ids.shape
    device = batch.input_ids.device
    pos = torch.arange(T, device=device)
    ks = torch.arange(K, device=device)
    src = pos[None, :] + ks[:, None]  # [K, T]: t + k
    pred, tgt = src + 2, src + 1  # the predicted token x_{t+k+2}, the target row t+k+1
    inside = pred < T  # [K, T]

    def at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # x[:, idx] -> [K, B, T]
        return x[:, idx.clamp(max=T - 1)].permute(1, 0, 2)

    out = (pred[:, None, :] < batch.lengths[None, :, None]) & inside[:, None, :] & at(batch.loss_mask, pred)
    doc_ids = batch.doc_ids
    if doc_ids is not None:
        out &= at(doc_ids, pred) == doc_ids[None]
    in_vocab = t2d.to(device)[at(batch.target_argmax, tgt)]  # (where tgt >= T, out is False)
    return out, out & in_vocab


def count_targets(batch: Any, t2d: torch.Tensor, ttt_length: int) -> torch.Tensor:
    """float64 [K]: valid rows of each TTT step in this micro-batch (the loss denominators)."""
    return step_masks(batch, t2d, ttt_length)[1].sum(dim=(1, 2)).double()


def as_head(target_head: Any, t2d: torch.Tensor) -> TargetHead:
    if isinstance(target_head, TargetHead):
        return target_head
    return TargetHead(rows=target_head, t2d=t2d, draft_ids=t2d.nonzero().squeeze(1))


def micro_step(
    ttt_forward: Callable[..., Iterator[torch.Tensor]],
    head: torch.Tensor,  # the draft's lm_head weight [Vd, H]
    loss_fn: Any,  # a components.Loss
    batch: Any,  # training.batch.Batch
    target_head: torch.Tensor | TargetHead,  # [Vd, H] target head rows (or the trainer's TargetHead)
    t2d: Optional[torch.Tensor],  # bool [V] (None: taken from a TargetHead)
    K: int,
    denominators: Optional[torch.Tensor] = None,  # float64 [K]; None = this micro-batch's own counts
    decay: float = 0.8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TTT unroll + loss of one micro-batch: ``(loss, stats)``.

    ``loss = sum_k decay**k * loss_sum_k / denominators[k]``; ``stats`` holds float64 [K] sums:
    ``loss_sum`` (unweighted), ``correct``, ``count`` (valid rows) and ``learned`` (rows whose
    predicted token is learned, in the draft vocab or not: the serving-comparable accuracy base).
    Also the function ``benchmarks/draft_step.py`` times."""
    th = as_head(target_head, t2d if t2d is not None else target_head.t2d)
    device = batch.input_ids.device
    stats = {name: torch.zeros(K, dtype=torch.float64, device=device)
             for name in ("loss_sum", "correct", "count", "learned")}
    # what the loss reads of the target, once per micro-batch (forward-kl: the target softmax of
    # every position, shared by the K steps)
    prepared = loss_fn.prepare(batch.final_hidden.flatten(0, 1), th)
    learned_k, valid_k = step_masks(batch, th.t2d, K)
    learned_counts = learned_k.sum(dim=(1, 2)).double()
    if denominators is None:
        denominators = valid_k.sum(dim=(1, 2)).double()
    weights = (decay ** torch.arange(K, device=device, dtype=torch.float64)) / denominators.clamp(min=1)
    total = None
    # packed rows (training/packing.py): rope positions and attention inside each document
    packed = {} if batch.doc_ids is None else {
        "position_ids": batch.position_ids, "doc_ids": batch.doc_ids}
    # every step's valid rows and weight are known before the forward: a loss that offers the
    # contract's fast path takes them up front (one host sync, not one per step) and returns one
    # differentiable total (components.Loss)
    make_groups = capability(loss_fn, "Loss.weighted_groups")
    groups = make_groups(prepared, valid_k.flatten(1), weights) if make_groups is not None else None
    for k, hidden in enumerate(ttt_forward(batch.input_ids, batch.aux_hidden, batch.attention_mask, K, **packed)):
        rows = target_rows(batch, k)
        if groups is not None:
            out: LossOutput = groups.add(k, hidden.flatten(0, 1), head, rows)
        else:
            out = loss_fn(hidden.flatten(0, 1), head, prepared, rows, valid_k[k].flatten())
            part = out.loss_sum * weights[k].to(out.loss_sum.dtype)
            total = part if total is None else total + part
        stats["loss_sum"][k] += out.loss_sum.detach().double()
        stats["correct"][k] += out.correct
        stats["count"][k] += out.count
    stats["learned"] += learned_counts
    if groups is not None:
        total = groups.finish()
    return total, stats


def acceptance_length(accs: Sequence[float]) -> float:
    """Simulated greedy-chain acceptance length: 1 + sum_k prod_{j<=k} acc_j."""
    total, prod = 1.0, 1.0
    for a in accs:
        prod *= a
        total += prod
    return total


def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-step metrics from the step's summed stats (see ``micro_step``)."""
    count = totals["count"].double()
    losses = (totals["loss_sum"] / count.clamp(min=1)).tolist()
    accs = (totals["correct"] / totals["learned"].double().clamp(min=1)).tolist()
    accs_in = (totals["correct"] / count.clamp(min=1)).tolist()
    metrics: dict[str, float] = {
        "accept_len": acceptance_length(accs),
        "accept_len_invocab": acceptance_length(accs_in),
        "valid_tokens": float(count[0]),
        "learned_tokens": float(totals["learned"][0]),
    }
    for k in range(len(losses)):
        metrics[f"loss_{k}"] = losses[k]
        metrics[f"acc_{k}"] = accs[k]
        metrics[f"acc_{k}_invocab"] = accs_in[k]
        metrics[f"valid_{k}"] = float(count[k])  # rows with loss (target argmax in the draft vocab)
        metrics[f"learned_{k}"] = float(totals["learned"][k])  # acc_k's base
    return metrics
