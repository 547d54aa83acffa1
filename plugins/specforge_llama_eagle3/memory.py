"""Activation checkpointing across TTT steps, for long sequences (32k tokens on one 80 GB GPU).

The bulk of what a TTT step keeps for backward lives in ``midlayer.finish``: o_proj input, the
residual, post-attention RMSNorm (fp32 copies) and the MLP's four [T, intermediate] tensors.
``checkpoint_finish`` keeps only that block's inputs and recomputes it in backward: about +17% of
the step's FLOPs for ~5.6 GB less per step at T=32768 (see docs/performance.md).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_finish(model: torch.nn.Module, enabled: bool = True) -> None:
    """Make ``model.midlayer.finish`` recompute its activations in backward (or undo that)."""
    layer = model.midlayer
    if not enabled:
        layer.__dict__.pop("finish", None)
        return
    plain = type(layer).finish.__get__(layer)
    layer.finish = functools.partial(checkpoint, plain, use_reentrant=False)
