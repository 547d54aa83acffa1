"""DSpark's training objective on a micro-batch (speculators' and SpecForge's DSpark recipe).

Blocks are DFlash's (``specforge_dflash.objective``: anchors every ``anchor_stride`` positions, one
forward for all blocks, optional ``train_block_lengths``) in DSpark's layout: slot k = 0..N-1 of
the block anchored at a predicts x[a+k+1] (the anchor slot predicts too). Per group k (one group
per slot):

    target row  = b*T + a+k                        (the target's distribution over x[a+k+1])
    prev token  = x[a+k]                           (teacher forcing: serving uses its own drafts)
    logits      = lm_head(h_k) + markov_w2(markov_w1[prev])
    learned     = a+k+1 < length & loss_mask[a+k+1] & k < the block's length
    valid       = learned & t2d[target_argmax[a+k]]

loss = sum_k w_k / D_k * [ sum_valid loss(logits, target)                      (the loss plugin)
                           + alpha * sum_valid BCE(conf_k, sum_v min(p_v, q_v)) ]

with w_k = exp(-k/gamma) (gamma 0: 1), D_k the step's valid rows of group k, q the Markov-corrected
draft distribution and p the target's over the draft vocabulary: the confidence head learns the
analytical acceptance probability 1 - TV(p, q) (detached). The Markov bias goes through the loss
plugin as one head: [h, markov_w1[prev]] @ [lm_head | markov_w2]^T is the corrected logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from specforge_dflash.objective import anchors, block_lengths, draft_hidden


def targets(batch: Any, a: torch.Tensor, N: int, t2d: torch.Tensor, block_len: torch.Tensor | None = None):
    """Per slot k = 0..N-1 of every block: (target row position a+k [Bn, A, N], learned, valid)."""
    ids = batch.input_ids
    Bn, T = ids.shape
    k = torch.arange(N, device=ids.device)
    tpos = a[:, None] + k[None, :]  # [A, N]: the position whose target distribution teaches slot k
    nxt = tpos + 1
    in_range = nxt[None] < batch.lengths[:, None, None]
    safe = tpos.clamp(max=T - 2)
    learned = in_range & batch.loss_mask[:, safe + 1]
    if block_len is not None:
        learned = learned & (k < block_len[..., None])
    valid = learned & t2d[batch.target_argmax[:, safe]]
    return safe.expand(Bn, -1, -1), learned, valid


def group_weights(N: int, gamma: float, device: Any) -> torch.Tensor:
    k = torch.arange(N, device=device, dtype=torch.float64)
    return torch.exp(-k / gamma) if gamma > 0 else torch.ones_like(k)


def count_targets(batch: Any, t2d: torch.Tensor, N: int, stride: int, lengths: tuple[int, ...] = ()) -> torch.Tensor:
    a = anchors(batch.input_ids.shape[1], stride, batch.input_ids.device)
    _, _, valid = targets(batch, a, N, t2d, block_lengths(batch.input_ids.shape[0], a, lengths, N))
    return valid.sum(dim=(0, 1)).double()


def acceptance_overlap(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """sum_v min(softmax(d)_v, softmax(t)_v) per row: the probability a sampled draft is accepted."""
    return torch.minimum(draft_logits.float().softmax(-1), target_logits.float().softmax(-1)).sum(-1)


def micro_step(draft: Any, batch: Any, ctx: Any, stride: int, gamma: float, alpha: float,
               lengths: tuple[int, ...] = ()):
    ids = batch.input_ids
    Bn, T = ids.shape
    N = draft.config.block_size
    a = anchors(T, stride, ids.device)
    bl = block_lengths(Bn, a, lengths, N)
    tpos, learned, valid = targets(batch, a, N, ctx.head.t2d, bl)
    S = max(lengths) if lengths else N
    hidden = draft_hidden(draft, batch, a, None if bl is not None and bool((bl == S).all()) else bl, S)
    markov = draft.markov_embed(ids[:, tpos[0]])  # [Bn, A, N, r]: prev token x[a+k]
    prepared = ctx.loss.prepare(batch.final_hidden.flatten(0, 1), ctx.head)
    final = batch.final_hidden.flatten(0, 1)
    rows = ((torch.arange(Bn, device=ids.device) * T)[:, None, None] + tpos).flatten(0, 1)  # [Bn*A, N]
    head = torch.cat([draft.lm_head.weight, draft.markov_head.markov_w2.weight], 1)  # [Vd, H + r]
    weights = group_weights(N, gamma, ids.device)
    loss = hidden.new_zeros((), dtype=torch.float32)
    zero = torch.zeros((), dtype=torch.float64, device=ids.device)
    sums, agree, conf_sums, conf_err, overlap = [], [], [], [], []
    for k in range(N):
        if k >= S:  # a slot no trained block has
            for lst in (sums, agree, conf_sums, conf_err, overlap):
                lst.append(zero)
            continue
        h, m = hidden[:, :, k].flatten(0, 1), markov[:, :, k].flatten(0, 1)
        v = valid[:, :, k].flatten()
        scale = weights[k] / ctx.denominators[k].clamp(min=1)
        out = ctx.loss(torch.cat([h, m], -1), head, prepared, rows[:, k], v)
        term = out.loss_sum
        sums.append(out.loss_sum.detach().double())
        agree.append(out.correct.double())
        if draft.confidence_head is not None:
            hv, mv, r = h[v], m[v], rows[:, k][v]
            with torch.no_grad():
                t_logits = ctx.head.logits(final[r].float() @ ctx.head.rows.float().T)  # softcapped as the target's
                c_star = acceptance_overlap(draft.logits(hv, mv), t_logits)
            c_logit = draft.confidence(hv, mv).float()
            bce = F.binary_cross_entropy_with_logits(c_logit, c_star, reduction="sum")
            term = term + alpha * bce.to(term.dtype)
            conf_sums.append(bce.detach().double())
            conf_err.append((c_logit.detach().sigmoid() - c_star).abs().sum().double())
            overlap.append(c_star.sum().double())
        else:
            conf_sums.append(zero)
            conf_err.append(zero)
            overlap.append(zero)
        loss = loss + term * scale.to(term.dtype)
    stats = {"loss_sum": torch.stack(sums), "correct": torch.stack(agree), "conf_loss_sum": torch.stack(conf_sums),
             "conf_abs_err": torch.stack(conf_err), "overlap": torch.stack(overlap),
             "valid": valid.sum(dim=(0, 1)).double(), "learned": learned.sum(dim=(0, 1)).double()}
    return loss, stats


def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    accept, run = 0.0, 1.0
    for k in range(totals["loss_sum"].numel()):
        valid, learned = float(totals["valid"][k]), float(totals["learned"][k])
        out[f"loss_{k + 1}"] = float(totals["loss_sum"][k]) / max(valid, 1)
        acc = float(totals["correct"][k]) / max(learned, 1)
        out[f"acc_{k + 1}"] = acc
        run *= acc  # accept length if slot accuracies were independent
        accept += run
    v = max(float(totals["valid"].sum()), 1)
    out["conf_loss"] = float(totals["conf_loss_sum"].sum()) / v
    out["conf_abs_err"] = float(totals["conf_abs_err"].sum()) / v  # |sigmoid(conf) - acceptance|
    out["accept_rate"] = float(totals["overlap"].sum()) / v  # mean sum_v min(p, q)
    out["accept_len"] = 1.0 + accept
    out["valid_tokens"] = float(totals["valid"].sum())
    return out
