"""Which samples each optimizer step trains: the seeded sample order and the token-budget plan.

``StepPlan`` is what every pipeline walks: step ``s``'s dataset indices and the data position after
it (what the step's checkpoint records, and where a resumed run continues).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional

import attrs
import torch

from specforge_core.training.packing import budget_schedule, pack_rows
from specforge_core.types import TargetFeatures


class SampleOrder:
    """Seeded per-epoch permutation; the position (epoch, index) is what a checkpoint records."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0
        self._perm = self._order(0)

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of ``epoch`` (what ``take`` walks through)."""
        return self._order(epoch)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._perm = self._order(epoch)

    def take(self, count: int) -> list[int]:
        """Up to ``count`` indices; an epoch's last step may be short (no sample is dropped)."""
        if self.index >= self.n:
            self.seek(self.epoch + 1, 0)
        out = self._perm[self.index : self.index + count]
        self.index += len(out)
        return out

    def visited_before(self) -> list[int]:
        """Indices visited before the current position (all of them after the first epoch)."""
        return list(range(self.n)) if self.epoch > 0 else self._perm[: self.index]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


@attrs.frozen
class BudgetPlan:
    """``training.token_budget``: the run's steps computed up front from the sample lengths (every
    epoch's seeded order through ``packing.budget_schedule``). ``steps[s]`` is step s's rows of
    sample indices, ``positions[s]`` the data position after it ({epoch, samples of that epoch
    trained}, what its checkpoint records); a resumed run recomputes the plan and continues at its
    step number."""

    steps: list[list[list[int]]]
    positions: list[dict[str, int]]
    dropped: list[int]  # samples of epoch tails too small to feed every rank (never trained)

    @classmethod
    def build(cls, lengths: Sequence[int], order: SampleOrder, row_tokens: int, n_rows: int,
              num_epochs: int, max_steps: int, min_step_samples: int = 1) -> BudgetPlan:
        """``min_step_samples``: the trainer rank count (every rank needs a sample in every
        micro-step): an epoch's last step with fewer samples is left out, its samples ``dropped``."""
        steps: list[list[list[int]]] = []
        positions: list[dict[str, int]] = []
        dropped: list[int] = []
        epoch = 0
        while (len(steps) < max_steps) if max_steps > 0 else (epoch < num_epochs):
            done = 0
            for rows in budget_schedule(lengths, order.permutation(epoch), row_tokens, n_rows):
                n = sum(len(r) for r in rows)
                done += n
                if n < min_step_samples:  # only an epoch's tail can be this small
                    dropped.extend(i for r in rows for i in r)
                    continue
                steps.append(rows)
                positions.append({"epoch": epoch, "index": done})
            epoch += 1
        if max_steps > 0:
            steps, positions = steps[:max_steps], positions[:max_steps]
        return cls(steps, positions, dropped)

    def fill(self, lengths: Sequence[int], row_tokens: int) -> float:
        """Real tokens / positions over the plan's non-empty rows."""
        rows = [r for step in self.steps for r in step if r]
        return sum(lengths[i] for r in rows for i in r) / max(len(rows) * row_tokens, 1)

    def micro_batches(self, step: int, feats: Sequence[TargetFeatures], rows_per_micro: int, row_tokens: int,
                      device: Any, dtype: Any) -> list[Any]:
        """Step ``step``'s packed micro-batches from its features (in ``sample_indices`` order);
        micro-batches whose rows are all empty (an epoch's tail) are left out."""
        rows = self.steps[step]
        at = {i: j for j, i in enumerate(self.sample_indices(step))}
        out = []
        for g in range(0, len(rows), rows_per_micro):
            group = rows[g : g + rows_per_micro]
            if any(group):
                members = [i for r in group for i in r]
                local = {i: k for k, i in enumerate(members)}
                out.append(pack_rows([feats[at[i]] for i in members], [[local[i] for i in r] for r in group],
                                     row_tokens, device, dtype))
        return out

    def sample_indices(self, step: int) -> list[int]:
        return [i for r in self.steps[step] for i in r]


class PlannedStep(NamedTuple):
    step: int  # 0-based optimizer step
    indices: list[int]  # dataset indices (into the usable samples), in row order with a budget
    position: dict[str, int]  # data position after this step


class StepPlan:
    """The run's steps: ``per_step`` samples in seeded order, or the token-budget plan.

    ``ranks`` trainer processes share each step (``per_step`` counts all of them)."""

    def __init__(self, training: Any, lengths: Sequence[int], seed: int, shuffle: bool, ranks: int = 1):
        tr = training
        self.lengths = list(lengths)
        self.ranks = ranks
        self.per_step = tr.micro_batch_size * tr.gradient_accumulation * ranks
        self.order = SampleOrder(len(self.lengths), seed, shuffle)
        self.budget: Optional[BudgetPlan] = None
        self.pack_tokens = tr.pack_tokens
        if tr.token_budget and not tr.pack_tokens:
            raise ValueError("training.token_budget = true needs training.pack_tokens > 0 (the row length, e.g. 8192)")
        if tr.token_budget:
            self.budget = BudgetPlan.build(self.lengths, self.order, tr.pack_tokens, self.per_step, tr.num_epochs,
                                           tr.max_steps, min_step_samples=ranks)
            self.total_steps = len(self.budget.steps)
        else:
            self.total_steps = tr.max_steps if tr.max_steps > 0 else (
                tr.num_epochs * math.ceil(len(self.lengths) / self.per_step))
        self.shape = self._describe(tr)

    def _describe(self, tr: Any) -> str:
        over = f" over {self.ranks} rank(s)" if self.ranks > 1 else ""
        if self.budget is None:
            return f"{self.per_step} per step{over}"
        return (f"token budget: {tr.gradient_accumulation} x {tr.micro_batch_size} rows of {tr.pack_tokens} "
                f"positions per step{' and rank' if self.ranks > 1 else ''}{over}, "
                f"{self.budget.fill(self.lengths, tr.pack_tokens):.1%} full")

    def resume(self, step: int, position: dict[str, int], checkpoint: Path) -> set[int]:
        """Continue after ``step`` (its checkpoint recorded ``position``); returns the indices
        trained before it."""
        if self.budget is not None:
            check_budget_position(self.budget, step, position, checkpoint)
            return {i for s in range(step) for i in self.budget.sample_indices(s)}
        self.order.seek(**position)
        return set(self.order.visited_before())

    def walk(self, start_step: int) -> Iterator[PlannedStep]:
        """Steps ``start_step ..`` (the sample order must be at ``start_step``'s position: ``resume``)."""
        for step in range(start_step, self.total_steps):
            if self.budget is not None:
                yield PlannedStep(step, self.budget.sample_indices(step), self.budget.positions[step])
            else:
                indices = self.order.take(self.per_step)
                yield PlannedStep(step, indices, self.order.position())

    def position_at(self, step: int) -> Optional[dict[str, int]]:
        """The data position after ``step`` steps, once ``resume`` put the order there (None
        before the first step of a token-budget plan)."""
        if self.budget is not None:
            return self.budget.positions[step - 1] if step else None
        return self.order.position()

    def dropped(self) -> list[int]:
        """Samples the plan never trains (token budget: epoch tails smaller than the rank count)."""
        return list(self.budget.dropped) if self.budget is not None else []


def check_budget_position(budget: BudgetPlan, step: int, saved: dict[str, int], checkpoint: Path) -> None:
    """A resumed token-budget run recomputes its plan: the checkpoint's data position must be the
    plan's after the same step, or the data or the packing settings changed since."""
    want = budget.positions[step - 1] if 0 < step <= len(budget.positions) else None
    if want is None or dict(saved) != want:
        raise ValueError(
            f"{checkpoint}: data position {dict(saved)} after step {step}, but this config's token-budget plan "
            f"has {want}: the dataset or training.pack_tokens / micro_batch_size / gradient_accumulation / "
            f"num_epochs / max_steps changed since the checkpoint; resume with the settings it was written with")
