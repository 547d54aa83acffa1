"""Activation checkpointing across TTT steps, for long sequences (32k tokens on one 80 GB GPU).

The bulk of what a TTT step keeps for backward lives in the layer's finish block: o_proj input,
the residual, post-attention RMSNorm and the MLP's [T, intermediate] tensors.
``checkpoint_finish`` keeps only that block's inputs and recomputes it in backward: about +6% step
time for ~5.6 GB less per step at T=32768 (see docs/performance.md).
"""

from __future__ import annotations

import torch


def checkpoint_finish(model: torch.nn.Module, enabled: bool = True) -> None:
    """Make ``model.ttt_forward`` recompute each step's finish block in backward (or undo that)."""
    model.checkpoint_finish = bool(enabled)
