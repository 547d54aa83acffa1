"""A third-party specforge plugin: the ``step-decay`` LR schedule.

Select it with ``training.scheduler = "step-decay"``; its options are the table
``[training.step-decay]``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from specforge_core import hookimpl
from specforge_core.config import in_range, option, positive


@attrs.define
class StepDecayOptions:
    every: int = option(100, "Multiply the LR by gamma every this many steps", validator=positive)
    gamma: float = option(0.5, "Multiplier applied at each decay", validator=in_range(0, 1, lo_open=True))


def make_step_decay(options: StepDecayOptions, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return options.gamma ** ((step - warmup_steps) // options.every)

    return factor


@hookimpl
def register_lr_schedulers(register):
    register("step-decay", make_step_decay, config=StepDecayOptions, description="LR x gamma every N steps")
