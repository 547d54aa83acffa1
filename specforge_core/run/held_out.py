"""Held-out acceptance during training (``training.eval_every``).

A fixed, seeded slice of the usable samples (``training.eval_samples``) is taken out of training
before the step plan is made; every ``eval_every`` optimizer steps (and at the last) the draft's
objective runs on their features without gradients and the algorithm's ``summarize`` turns the
summed statistics into the same metrics as a training step (per-depth accuracies, simulated tau).
Teacher-forced, so it is the cheap estimate, not a greedy chain; but it is measured on text the
draft never trained on, so it shows when more steps stop paying (training accuracy keeps rising
as the draft memorises). The metrics go into the step's record as ``held_out/<name>`` (history,
W&B as ``train/held_out/<name>``) and one console line.

Both pipelines run the same two observers: ``HeldOut`` next to the trainer (every rank of a Ray
run, each on its share of the samples) and ``HeldOutLine`` where the metrics are (the local
process, the Ray driver). Where the features come from is the pipeline's: the local target
backend here (``observers_for``), the Ray inference engines in ``pipeline/ray/held_out.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from specforge_core.components import ObjectiveContext, capability
from specforge_core.export import export_draft
from specforge_core.run.observers import MetricDisplay, Observer, StepRecord
from specforge_core.types import Sample, TargetFeatures

PREFIX = "held_out/"


def split_held_out(usable: Sequence[Sample], n: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """``(train, held_out)``: ``n`` samples drawn by a seeded permutation (the same on every run
    and resume of the same data and seed), the rest in their original order. At least one sample
    stays for training."""
    n = min(n, len(usable) - 1)
    if n <= 0:
        return list(usable), []
    g = torch.Generator().manual_seed(seed + 7919)  # not the sample order's seed stream
    held = set(torch.randperm(len(usable), generator=g)[:n].tolist())
    return ([s for i, s in enumerate(usable) if i not in held],
            [s for i, s in enumerate(usable) if i in held])


@torch.no_grad()
def held_out_metrics(trainer: Any, feats: Sequence[TargetFeatures], micro_batch_size: int,
                     counted: bool = True) -> dict[str, float]:
    """The algorithm's step metrics of ``feats`` under the trainer's current weights, without a
    gradient or an optimizer step: the training step's statistics, summed over micro-batches of
    ``micro_batch_size`` samples (packed as training packs them) and summarised by the algorithm.

    Several trainer ranks (the Ray pipeline) each pass their share of the held-out samples; the
    loss denominators and statistics are summed over ranks, as in a training step, and every rank
    runs as many forwards as the busiest one (FSDP2 gathers the parameters in each forward; a
    rank's extra ones repeat its first batch, uncounted). ``counted=False``: ``feats`` is a
    stand-in for a rank that has no held-out sample of its own (it only takes part)."""
    if not feats:
        raise ValueError("held-out evaluation: no samples")
    groups = [list(feats[i : i + micro_batch_size]) for i in range(0, len(feats), micro_batch_size)]
    batches = trainer._assemble(groups)
    strategy, n = trainer.strategy, len(batches)
    forwards = n
    if strategy.world_size > 1:  # the busiest rank's number of forwards
        mine = torch.zeros(strategy.world_size, dtype=torch.float64, device=trainer.device)
        mine[strategy.rank] = n
        forwards = int(strategy.all_reduce(mine).max())
    keep = 1.0 if counted else 0.0
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        denominators = sum(trainer.algorithm.count_targets(b, trainer.head) for b in batches).double() * keep
        denominators = strategy.all_reduce(denominators)
        ctx = ObjectiveContext(loss=trainer.loss_fn, head=trainer.head, denominators=denominators)
        totals: dict[str, torch.Tensor] = {}
        for i in range(forwards):
            with trainer._autocast():
                _loss, stats = trainer._objective(batches[i] if i < n else batches[0], ctx)
            weight = keep if i < n else 0.0
            for name, value in stats.items():
                value = value.detach().double() * weight
                totals[name] = value if name not in totals else totals[name] + value
    finally:
        trainer.model.train(was_training)
    if strategy.world_size > 1:  # one all-reduce of every statistic, as train_step does
        names = sorted(totals)
        flat = strategy.all_reduce(torch.cat([totals[k].reshape(-1) for k in names]))
        offset = 0
        for k in names:
            size = totals[k].numel()
            totals[k] = flat[offset : offset + size].view(totals[k].shape)
            offset += size
    return trainer.algorithm.summarize({k: v.cpu() for k, v in totals.items()})


def prompt_ids(sample: Sample) -> list[int]:
    """A held-out conversation's tokens before its first learned token (the prompt of its first reply)."""
    learned = sample.loss_mask.nonzero()
    end = int(learned[0]) if learned.numel() else sample.num_tokens
    return sample.input_ids[:end].tolist()


class Chain:
    """The real greedy chain: the draft exported to ``export_dir`` by ``export(export_dir)`` (the
    trainer's current weights; on several ranks a gather, every rank calls it, rank 0 writes), then
    where it wrote ``evaluate`` (the hf engine, the algorithm's proposer) on ``prompts``; returns the
    chain's acceptance length (tokens per target forward), None where ``export`` wrote nothing."""

    def __init__(self, trainer: Any, export: Callable[[Path], Optional[Path]], export_dir: Path, target: str,
                 prompts: list[list[int]], steps: int, max_new_tokens: int):
        self.trainer, self.export, self.export_dir, self.target = trainer, export, export_dir, target
        self.prompts, self.steps, self.max_new_tokens = prompts, steps, max_new_tokens

    def __call__(self) -> Optional[float]:
        from specforge_core.evaluation.evaluate import evaluate

        if self.export(self.export_dir) is None:
            return None  # another rank writes and evaluates
        # the target in the training dtype (fp32 on CPU, bf16 on GPU by default), loaded for each estimate
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.trainer.dtype, "fp32")
        report = evaluate(self.export_dir, self.target, self.prompts, steps=self.steps,
                          max_new_tokens=self.max_new_tokens, check=False, device=str(self.trainer.device),
                          batch_size=len(self.prompts), dtype=dtype)
        return float(report.overall.tau)


class HeldOut(Observer):
    """Runs ``held_out_metrics`` every ``every`` steps and at the last, next to the trainer (every
    rank of a Ray run); ``features()`` gives this rank's held-out target features (called once, at
    the first estimate). Puts ``held_out/<metric>`` into the record, so put it before the observers
    that read the record's metrics (recorder, console, W&B; on Ray rank 0's report)."""

    def __init__(self, trainer: Any, features: Callable[[], list[TargetFeatures]], every: int,
                 micro_batch_size: int, chain: Optional[Chain] = None, counted: bool = True):
        self.trainer, self.features, self.every, self.chain = trainer, features, every, chain
        self.micro_batch_size, self.counted = micro_batch_size, counted
        self.feats: Optional[list[TargetFeatures]] = None

    def on_step(self, record: StepRecord) -> None:
        if record.step % self.every and record.step != record.total_steps:
            return
        if self.feats is None:
            self.feats = self.features()
        m = held_out_metrics(self.trainer, self.feats, self.micro_batch_size, self.counted)
        if self.chain is not None and (tau := self.chain()) is not None:
            m["chain_accept_len"] = tau
        record.metrics.update({PREFIX + k: v for k, v in m.items()})


class HeldOutLine(Observer):
    """The console line of each estimate (where the metrics are: the local process, the Ray driver):
    ``held-out step N: acc ... | tau x (+d since step M) [| greedy chain tau y on P prompts] | S samples
    never trained on``."""

    def __init__(self, display: MetricDisplay, console: Any, samples: int, chain_prompts: int):
        self.display, self.console, self.samples, self.chain_prompts = display, console, samples, chain_prompts
        self.last: Optional[tuple[int, float]] = None  # (step, headline value) of the previous estimate

    def on_step(self, record: StepRecord) -> None:
        m = {k[len(PREFIX):]: v for k, v in record.metrics.items() if k.startswith(PREFIX)}
        if m:
            self.console.print(self.line(record.step, m))

    def line(self, step: int, m: dict[str, float]) -> str:
        shown = [f"{label} " + " ".join(f"{m[n]:.3f}" for n in names if n in m)
                 for label, names in self.display.groups.items() if any(n in m for n in names)]
        # the last group's first metric is the one to watch (tau); its change since the last estimate
        watched = [names[0] for names in self.display.groups.values() if names and names[0] in m]
        change = ""
        if watched:
            value = m[watched[-1]]
            if self.last is not None:
                change = f" ({value - self.last[1]:+.3f} since step {self.last[0]})"
            self.last = (step, value)
        chain = (f" | greedy chain tau {m['chain_accept_len']:.3f} on {self.chain_prompts} prompts"
                 if "chain_accept_len" in m else "")
        return f"held-out step {step}: " + " | ".join(shown) + change + chain + f" | {self.samples} samples never trained on"


def chain_prompts(run: Any) -> list[list[int]]:
    """The greedy chain's prompts: the first ``training.eval_chain_prompts`` held-out conversations'."""
    return [prompt_ids(s) for s in run.held_out[: run.config.training.eval_chain_prompts]]


def line_observers(run: Any) -> list[Observer]:
    """Where the metrics are (both pipelines): the held-out console line (none when
    ``training.eval_every`` is 0 or nothing could be held out)."""
    if not run.config.training.eval_every:
        return []
    if not run.held_out:  # a one-sample dataset: nothing can be held out
        run.console.print("training.eval_every: the dataset has one usable sample; no held-out estimate")
        return []
    named = capability(run.algorithm, "DraftAlgorithm.display_metrics")
    display = MetricDisplay(dict(named()) if named is not None else {})
    return [HeldOutLine(display, run.console, len(run.held_out), len(chain_prompts(run)))]


def observers_for(run: Any, trainer: Any, backend: Any) -> list[Observer]:
    """The local pipeline's held-out observers (none when ``training.eval_every`` is 0): the estimate
    and its console line; the held-out samples' features come from the run's target backend (or
    feature cache), in batches of ``inference.batch_size``."""
    line = line_observers(run)
    if not line:
        return []
    c = run.config
    bs = c.inference.batch_size

    def features() -> list[TargetFeatures]:
        out: list[TargetFeatures] = []
        for start in range(0, len(run.held_out), bs):
            out.extend(backend.generate(run.held_out[start : start + bs]))
        return out

    chain = None
    if c.training.eval_chain_prompts:
        def export(out: Path) -> Path:
            return export_draft(trainer.draft, run.vocab, out, trainer.algorithm)

        chain = Chain(trainer, export, run.out_dir / "held_out_export", str(c.model.target), chain_prompts(run),
                      c.eval.steps, c.eval.max_new_tokens)
    return [HeldOut(trainer, features, c.training.eval_every, c.training.micro_batch_size, chain), *line]
