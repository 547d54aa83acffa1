"""Which target-side tensors the draft's TTT step k is trained against.

The draft's step-k output at position t has consumed token x_{t+k+1} (and, through its hidden
state, everything up to it), so it predicts x_{t+k+2}. The target's distribution over that token is
its lm_head applied to its final hidden state at position t+k+1. Hence, for step k:

    target_hidden[t] = final_hidden[t+k+1]
    valid[t]         = (t+k+2 < length)              # the predicted token exists
                       & loss_mask[t+k+2]            # ... and is an assistant token we learn
                       & t2d[target_argmax[t+k+1]]   # ... and the target's top token is in the draft vocab

(see /work/shared/reference/eagle3.md, "Alignment at step k"). Positions past the end get zeros and
``valid = False``.
"""

from __future__ import annotations

import torch

from specforge_core.training.batch import Batch


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``out[:, t] = x[:, t+n]`` along dim 1, zero-filled past the end."""
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


def align_valid(batch: Batch, k: int, t2d: torch.Tensor) -> torch.Tensor:
    """``valid`` bool [B, T] of TTT step ``k`` alone: small [B, T] index arithmetic, no copy of
    ``final_hidden`` (what a loss with precomputed targets needs).

    ``t2d`` is the bool [V_target] mask of target ids that are in the draft vocab.
    """
    T = batch.input_ids.shape[1]
    pos = torch.arange(T, device=batch.input_ids.device)
    argmax = shift_left(batch.target_argmax, k + 1)
    in_range = (pos[None, :] + k + 2) < batch.lengths[:, None]
    predicted_is_learned = shift_left(batch.loss_mask, k + 2)
    in_draft_vocab = t2d.to(argmax.device)[argmax]
    return in_range & predicted_is_learned & in_draft_vocab


def align_step(batch: Batch, k: int, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target tensors for TTT step ``k``: ``(target_hidden [B, T, H], valid bool [B, T])``.

    ``t2d`` is the bool [V_target] mask of target ids that are in the draft vocab.
    """
    return shift_left(batch.final_hidden, k + 1), align_valid(batch, k, t2d)
