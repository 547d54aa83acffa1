"""P-EAGLE's training objective on a micro-batch: COD-sampled chains of masked slots, one forward.

Elements of a row of length n (``model.py``): the context entries p = 0..T-1, (x[p+1], f[p]) at
position p, and, for each sampled anchor a, its masked slots d = 1..D[a] at positions a+d.

Alignment (depth d = 0 is the context entry itself, the anchor):

    element (a, d) predicts   x[a+d+2]
    target row               b*T + a+d+1                 (the target's state that predicted it)
    learned                  a+d+2 < n & loss_mask[a+d+2]
    valid                    learned & t2d[target_argmax[a+d+1]]   (the loss rows)

Attention (as served, ``proposer.py``): a context entry sees the entries at or before it; slot d
of anchor a sees the entries 0..a and its own chain's slots 1..d.

COD sampling (the peers' "conditional drop-token" sampling, speculators / SpecForge): depth 0 keeps
every position; an anchor's chain reaches depth d with probability max(r^d, r_min) (r =
``down_sample_ratio``), and only while every token it predicts on the way is learned. Chains are
nested (depth d only where d-1 is), so each slot sees exactly the slots it sees when served. The
draws are a pure function of the micro-batch's content and the run seed: ``count_targets`` and
``objective`` see the same chains, a resumed run the same as an uninterrupted one, and a sample
regrouped with others in a later epoch gets new draws.

Loss (the peers' recipe): the per-token divergence summed over every valid element of every
depth, divided by the step's valid elements of all depths together (``ctx.denominators.sum()``):
one mean over all predictions, so deep slots weigh by how many COD keeps. Groups = depths (for the
per-depth metrics ``acc_d``, d = 1..K: draft token d).
"""

from __future__ import annotations

from typing import Any

import torch

_MIX = 6364136223846793005  # Knuth's LCG multiplier: spreads the content hash over 63 bits


def chain_seed(batch: Any, seed: int) -> int:
    """A deterministic 63-bit seed from the micro-batch's tokens, lengths and the run seed."""
    ids = batch.input_ids
    T = ids.shape[1]
    w = torch.arange(1, T + 1, device=ids.device, dtype=torch.int64) * 2654435761 % 1000003
    rows = (ids.to(torch.int64) * w).sum(1) % 998244353  # per row, exact in int64
    r = torch.arange(1, ids.shape[0] + 1, device=ids.device, dtype=torch.int64)
    h = int(((rows * r * 31 + batch.lengths.to(torch.int64) * 7).sum()).item())
    return (h * _MIX + int(seed) * 1442695040888963407) % (2**63 - 1)


def learned_targets(batch: Any, depths: int, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """learned, valid: bool [B, T, K] for element (p, d): its predicted token x[p+d+2] is learned /
    a loss row (padded batch: positions past a row's length are never learned)."""
    ids = batch.input_ids
    Bn, T = ids.shape
    tgt = torch.arange(T, device=ids.device)[:, None] + torch.arange(depths, device=ids.device)[None] + 2  # [T, K]
    in_range = tgt[None] < batch.lengths[:, None, None]
    safe = tgt.clamp(max=T - 1)
    learned = in_range & batch.loss_mask[:, safe]
    valid = learned & t2d[batch.target_argmax[:, safe - 1]]
    return learned, valid


def chain_depths(batch: Any, learned: torch.Tensor, depths: int, ratio: float, ratio_min: float,
                 seed: int) -> torch.Tensor:
    """int64 [B, T]: how many masked slots each anchor's sampled chain has (0..K-1)."""
    ids = batch.input_ids
    gen = torch.Generator(device=ids.device).manual_seed(chain_seed(batch, seed))
    u = torch.rand(ids.shape, generator=gen, device=ids.device)  # one draw per anchor
    d = torch.arange(1, depths, device=ids.device)
    keep = torch.clamp(torch.tensor(ratio, dtype=torch.float64) ** d.double(), min=ratio_min).float()  # [K-1]
    ok = (u[..., None] < keep) & learned[..., 1:]  # [B, T, K-1]: slot d kept and its token learned
    return ok.long().cumprod(-1).sum(-1)  # nested: stop at the first slot not kept


def count_targets(batch: Any, t2d: torch.Tensor, depths: int, ratio: float, ratio_min: float,
                  seed: int) -> torch.Tensor:
    learned, valid = learned_targets(batch, depths, t2d)
    D = chain_depths(batch, learned, depths, ratio, ratio_min, seed)
    present = torch.arange(depths, device=D.device) <= D[..., None]  # [B, T, K]
    return (valid & present).sum(dim=(0, 1)).double()


def layout(batch: Any, D: torch.Tensor, depths: int):
    """The elements of every row: (anchor, depth, real) [B, N] with the T context entries first,
    then the sampled slots (right-padded to the longest row); and attend [B, N, N]."""
    ids = batch.input_ids
    Bn, T = ids.shape
    dev = ids.device
    d = torch.arange(1, depths, device=dev)
    sel = (d <= D[..., None]).flatten(1)  # [B, T*(K-1)] in (anchor, depth) order
    count = sel.sum(1)
    M = int(count.max()) if sel.numel() else 0
    order = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :M]  # selected first
    slot_anchor, slot_depth = order // (depths - 1), order % (depths - 1) + 1
    slot_real = torch.arange(M, device=dev)[None] < count[:, None]
    anchor = torch.cat([torch.arange(T, device=dev).expand(Bn, -1), slot_anchor], 1)
    depth = torch.cat([torch.zeros(Bn, T, dtype=torch.long, device=dev), slot_depth * slot_real], 1)
    real = torch.cat([torch.ones(Bn, T, dtype=torch.bool, device=dev), slot_real], 1)
    qa, ka = anchor[:, :, None], anchor[:, None, :]
    qd, kd = depth[:, :, None], depth[:, None, :]
    attend = ((kd == 0) & (ka <= qa)) | ((ka == qa) & (kd <= qd) & (kd > 0))
    attend = (attend & real[:, None, :] & real[:, :, None]) | torch.eye(T + M, dtype=torch.bool, device=dev)
    return anchor, depth, real, attend


def micro_step(draft: Any, batch: Any, ctx: Any, ratio: float, ratio_min: float, seed: int):
    ids = batch.input_ids
    Bn, T = ids.shape
    K = draft.config.num_depths
    learned, valid = learned_targets(batch, K, ctx.head.t2d)
    D = chain_depths(batch, learned, K, ratio, ratio_min, seed)
    anchor, depth, real, attend = layout(batch, D, K)
    is_mask = depth > 0
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)  # x[p+1] (0 past the end)
    el_ids = torch.where(is_mask, torch.full_like(anchor, draft.config.mask_token_id), nxt.gather(1, anchor))
    feats = batch.aux_hidden.gather(1, anchor[..., None].expand(-1, -1, batch.aux_hidden.shape[-1]))
    hidden = draft(el_ids, feats, is_mask, anchor + depth, attend).flatten(0, 1)  # [B*N, H]

    rows = (torch.arange(Bn, device=ids.device)[:, None] * T + (anchor + depth + 1).clamp(max=T - 1)).flatten()
    el_valid = (valid.gather(1, anchor[..., None].expand(-1, -1, K)).gather(2, depth[..., None])[..., 0] & real)
    el_learned = (learned.gather(1, anchor[..., None].expand(-1, -1, K)).gather(2, depth[..., None])[..., 0] & real)
    prepared = ctx.loss.prepare(batch.final_hidden.flatten(0, 1), ctx.head)
    scale = 1.0 / ctx.denominators.sum().clamp(min=1)
    loss = hidden.new_zeros((), dtype=torch.float32)
    flat_depth, flat_valid = depth.flatten(), el_valid.flatten()
    sums, agree = [], []
    for g in range(K):
        idx = ((flat_depth == g) & real.flatten()).nonzero().squeeze(1)
        out = ctx.loss(hidden.index_select(0, idx), draft.lm_head.weight, prepared, rows.index_select(0, idx),
                       flat_valid.index_select(0, idx))
        loss = loss + out.loss_sum * scale.to(out.loss_sum.dtype)
        sums.append(out.loss_sum.detach().double())
        agree.append(out.correct.double())
    per_depth = torch.arange(K, device=ids.device)[None, None] == depth[..., None]  # [B, N, K]
    stats = {"loss_sum": torch.stack(sums), "correct": torch.stack(agree),
             "valid": (per_depth & el_valid[..., None]).sum(dim=(0, 1)).double(),
             "learned": (per_depth & el_learned[..., None]).sum(dim=(0, 1)).double(),
             "elements": torch.tensor([float(real.sum())], dtype=torch.float64, device=ids.device)}
    return loss, stats


def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    accept, run = 0.0, 1.0
    for g in range(totals["loss_sum"].numel()):
        valid, learned = float(totals["valid"][g]), float(totals["learned"][g])
        out[f"loss_{g + 1}"] = float(totals["loss_sum"][g]) / max(valid, 1)
        acc = float(totals["correct"][g]) / max(learned, 1)
        out[f"acc_{g + 1}"] = acc
        run *= acc  # accept length if depth accuracies were independent: sum_j prod_{i<=j} acc_i
        accept += run
    out["accept_len"] = 1.0 + accept
    out["valid_tokens"] = float(totals["valid"].sum())
    out["elements"] = float(totals["elements"].sum())  # context entries + sampled slots (the work)
    return out
