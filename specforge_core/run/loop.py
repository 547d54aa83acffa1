"""The step loop: batches from a source -> ``Trainer.train_step`` -> observers.

Every pipeline runs this loop next to its trainer; only the batch source differs (the local
pipeline's runs the target in process, the Ray trainer actor's is fed by the controller).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol

import attrs

from specforge_core.run.observers import Observer, StepRecord


@attrs.define
class StepBatch:
    """One optimizer step's input on this rank."""

    micro: Sequence[Any]  # micro-batches, as ``Trainer.train_step`` takes them
    position: Optional[dict[str, int]]  # data position after this step
    metrics: dict[str, float] = attrs.field(factory=dict)  # the source's own (e.g. data_wait_s)
    tag: Any = None  # the source's bookkeeping (what ``trained`` acknowledges)


class BatchSource(Protocol):
    """Where a loop's batches come from."""

    def __iter__(self) -> Iterator[StepBatch]: ...

    def trained(self, batch: StepBatch) -> None:
        """Called after ``batch``'s step (before the observers)."""


class StepLoop:
    def __init__(self, trainer: Any, source: BatchSource, observers: Sequence[Observer]):
        self.trainer, self.source, self.observers = trainer, source, list(observers)

    def run(self) -> bool:
        """Train until the source ends or an observer asks to stop; True if the run finished
        (the source ended, or ``trainer.step`` reached ``total_steps``)."""
        t = self.trainer
        for o in self.observers:
            o.on_start(t.step, t.total_steps)
        finished = False
        try:
            for batch in self.source:
                metrics = t.train_step(batch.micro)
                metrics.update(batch.metrics)
                self.source.trained(batch)
                record = StepRecord(t.step, t.total_steps, metrics, batch.position)
                for o in self.observers:
                    o.on_step(record)
                if any(o.stop_requested for o in self.observers):
                    finished = t.step >= t.total_steps
                    break
            else:  # the source ended (a step whose samples were all skipped is not trained)
                finished = True
        finally:
            for o in reversed(self.observers):
                o.on_end(finished)
        return finished
