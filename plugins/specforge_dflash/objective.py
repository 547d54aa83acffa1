"""DFlash's training objective on a micro-batch: blocks at anchors, one forward, per-slot loss.

Anchors. A block is anchored at every position a = 1, 1+s, 1+2s, ... (s = ``anchor_stride``) with
a + 1 < length (at least one token to predict). Its query is [x[a], MASK x (B-1)] at positions
a..a+B-1; its context is the target's features f[0..a-1]; all blocks of a row run in one forward,
each seeing only its own context prefix and its own block (``model.block_attention``).

Alignment. Slot j (1..B-1) of the block at a predicts x[a+j]. The target's distribution over that
token is its lm_head on its final hidden state at a+j-1, so, per group j (one group per slot):

    target row   = b*T + a+j-1
    learned      = a+j < length & loss_mask[a+j]            (the token exists and is learned)
    valid        = learned & t2d[target_argmax[a+j-1]]      (loss rows: the target's top token is
                                                             in the draft vocab)

Group j's summed loss is divided by its valid rows in the whole optimizer step
(``ctx.denominators[j-1]``) and weighted by exp(-(j-1)/gamma) (DFlash's position decay; gamma 0:
all slots weigh 1). ``acc_j`` counts learned rows whose target top token is out of the draft vocab
as misses, like serving does.

Block lengths. Serving with K draft tokens runs a block of 1 + K slots, and the block attends
bidirectionally, so a draft trained only on whole blocks sees a different block when K < B-1.
``lengths`` (``model.dflash.train_block_lengths``) trains blocks of those lengths instead: the
block of anchor i in row b has lengths[(b + i) % len(lengths)] slots (the later slots are not keys
and not trained), so every length gets an equal share of the blocks, reproducibly.
"""

from __future__ import annotations

from typing import Any

import torch


def anchors(T: int, stride: int, device: Any) -> torch.Tensor:
    """int64 [A]: anchor positions of a batch padded to length T (per-row validity: ``targets``)."""
    return torch.arange(1, max(T - 1, 1), stride, device=device)


def block_lengths(rows: int, a: torch.Tensor, lengths: tuple[int, ...], block_size: int) -> torch.Tensor | None:
    """int64 [rows, A]: slots of each block; None when every block is whole."""
    if not lengths or set(lengths) == {block_size}:
        return None
    L = torch.tensor(lengths, device=a.device)
    i = torch.arange(rows, device=a.device)[:, None] + torch.arange(a.numel(), device=a.device)[None]
    return L[i % len(lengths)]


def targets(batch: Any, a: torch.Tensor, block_size: int, t2d: torch.Tensor, block_len: torch.Tensor | None = None):
    """Per slot j=1..B-1 of every block: (target position [B, A, B-1], learned, valid) bools."""
    ids = batch.input_ids
    Bn, T = ids.shape
    j = torch.arange(1, block_size, device=ids.device)
    tpos = a[:, None] + j[None, :]  # [A, B-1]
    in_range = tpos[None] < batch.lengths[:, None, None]  # [Bn, A, B-1]
    safe = tpos.clamp(max=T - 1)
    learned = in_range & batch.loss_mask[:, safe]
    if block_len is not None:
        learned = learned & (j < block_len[..., None])
    valid = learned & t2d[batch.target_argmax[:, safe - 1]]
    return safe.expand(Bn, -1, -1), learned, valid


def group_weights(block_size: int, gamma: float, device: Any) -> torch.Tensor:
    j = torch.arange(block_size - 1, device=device, dtype=torch.float64)
    return torch.exp(-j / gamma) if gamma > 0 else torch.ones_like(j)


def count_targets(batch: Any, t2d: torch.Tensor, block_size: int, stride: int,
                  lengths: tuple[int, ...] = ()) -> torch.Tensor:
    a = anchors(batch.input_ids.shape[1], stride, batch.input_ids.device)
    bl = block_lengths(batch.input_ids.shape[0], a, lengths, block_size)
    _, _, valid = targets(batch, a, block_size, t2d, bl)
    return valid.sum(dim=(0, 1)).double()


def draft_hidden(draft: Any, batch: Any, a: torch.Tensor, block_len: torch.Tensor | None = None,
                 slots: int | None = None) -> torch.Tensor:
    """[Bn, A, S, H]: the draft's normed output for every block of the micro-batch (S = ``slots``,
    default block_size), one forward."""
    ids = batch.input_ids
    Bn, T = ids.shape
    block = slots or draft.config.block_size
    q_ids = draft.block_ids(ids[:, a], block)  # [Bn, A, S]
    q_pos = (a[:, None] + torch.arange(block, device=ids.device)).expand(Bn, -1, -1)
    ctx_pos = torch.arange(T, device=ids.device).expand(Bn, -1)
    visible = ctx_pos[:, None, :] < a[None, :, None]  # [Bn, A, T]: the block at a sees f[0..a-1]
    return draft(q_ids, q_pos, draft.context(batch.aux_hidden), ctx_pos, visible, block_len)


def micro_step(draft: Any, batch: Any, ctx: Any, stride: int, gamma: float, lengths: tuple[int, ...] = ()):
    ids = batch.input_ids
    Bn, T = ids.shape
    block = draft.config.block_size
    a = anchors(T, stride, ids.device)
    bl = block_lengths(Bn, a, lengths, block)
    tpos, learned, valid = targets(batch, a, block, ctx.head.t2d, bl)
    S = max(lengths) if lengths else block  # no block is longer: the later slots need no forward
    hidden = draft_hidden(draft, batch, a, None if bl is not None and bool((bl == S).all()) else bl, S)
    prepared = ctx.loss.prepare(batch.final_hidden.flatten(0, 1), ctx.head)
    row0 = (torch.arange(Bn, device=ids.device) * T)[:, None, None]
    rows = (row0 + tpos - 1).flatten(0, 1)  # [Bn*A, B-1]
    weights = group_weights(block, gamma, ids.device)
    loss = hidden.new_zeros((), dtype=torch.float32)
    G = block - 1
    sums, agree = [], []
    for g in range(G):
        if g + 1 >= S:  # a slot no trained block has
            sums.append(torch.zeros((), dtype=torch.float64, device=ids.device))
            agree.append(torch.zeros((), dtype=torch.float64, device=ids.device))
            continue
        h = hidden[:, :, g + 1].flatten(0, 1)
        out = ctx.loss(h, draft.lm_head.weight, prepared, rows[:, g], valid[:, :, g].flatten())
        loss = loss + out.loss_sum * (weights[g] / ctx.denominators[g].clamp(min=1)).to(out.loss_sum.dtype)
        sums.append(out.loss_sum.detach().double())
        agree.append(out.correct.double())
    stats = {"loss_sum": torch.stack(sums), "correct": torch.stack(agree),
             "valid": valid.sum(dim=(0, 1)).double(), "learned": learned.sum(dim=(0, 1)).double()}
    return loss, stats


def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    accept, run = 0.0, 1.0
    for g in range(totals["loss_sum"].numel()):
        valid, learned = float(totals["valid"][g]), float(totals["learned"][g])
        out[f"loss_{g + 1}"] = float(totals["loss_sum"][g]) / max(valid, 1)
        acc = float(totals["correct"][g]) / max(learned, 1)
        out[f"acc_{g + 1}"] = acc
        out[f"acc_{g + 1}_invocab"] = float(totals["correct"][g]) / max(valid, 1)
        run *= acc  # accept length if slot accuracies were independent: sum_j prod_{i<=j} acc_i
        accept += run
    out["accept_len"] = 1.0 + accept
    out["valid_tokens"] = float(totals["valid"].sum())
    return out
