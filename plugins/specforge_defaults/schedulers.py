"""LR schedules: ``constant``, ``linear``, ``cosine``, each after a linear warmup.

A factory returns the multiplier of the peak LR at optimizer step ``s`` (0-based), which the trainer
wraps in ``torch.optim.lr_scheduler.LambdaLR``:

- warmup (``s < W``): ``(s + 1) / W``. The first step already learns (HF's ``s / W`` wastes it) and
  step ``W - 1`` reaches the peak.
- then, with progress ``p = (s - W) / (T - W)`` clamped to [0, 1]: constant ``1``; linear
  ``1 - p * (1 - m)``; cosine ``m + (1 - m) * (1 + cos(pi * p)) / 2``, where ``m = min_lr_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from specforge_core.config.fields import in_range, option


@attrs.define
class DecayOptions:
    min_lr_ratio: float = option(0.0, "Final LR as a fraction of the peak LR", validator=in_range(0, 1))


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"LR schedule: total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"LR schedule: warmup_steps must be >= 0, got {warmup_steps}")


def _with_warmup(
    total_steps: int, warmup_steps: int, decay: Callable[[float], float]
) -> Callable[[int], float]:
    _check(total_steps, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
        return decay(progress)

    return multiplier


def make_constant(options: None, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    return _with_warmup(total_steps, warmup_steps, lambda p: 1.0)


def make_linear(options: DecayOptions | None, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    m = (options or DecayOptions()).min_lr_ratio
    return _with_warmup(total_steps, warmup_steps, lambda p: 1.0 - p * (1.0 - m))


def make_cosine(options: DecayOptions | None, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    m = (options or DecayOptions()).min_lr_ratio
    return _with_warmup(total_steps, warmup_steps, lambda p: m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p)))
