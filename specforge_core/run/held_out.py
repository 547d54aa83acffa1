"""Held-out acceptance during training (``training.eval_every``).

A fixed, seeded slice of the usable samples (``training.eval_samples``) is taken out of training
before the step plan is made; every ``eval_every`` optimizer steps (and at the last) the draft's
objective runs on their features without gradients and the algorithm's ``summarize`` turns the
summed statistics into the same metrics as a training step (per-depth accuracies, simulated tau).
Teacher-forced, so it is the cheap estimate, not a greedy chain; but it is measured on text the
draft never trained on, so it shows when more steps stop paying (training accuracy keeps rising
as the draft memorises). The metrics go into the step's record as ``held_out/<name>`` (history,
W&B as ``train/held_out/<name>``) and one console line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from specforge_core.components import ObjectiveContext, capability
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
def held_out_metrics(trainer: Any, feats: Sequence[TargetFeatures], micro_batch_size: int) -> dict[str, float]:
    """The algorithm's step metrics of ``feats`` under the trainer's current weights, without a
    gradient or an optimizer step: the training step's statistics, summed over micro-batches of
    ``micro_batch_size`` samples (packed as training packs them) and summarised by the algorithm."""
    if not feats:
        raise ValueError("held-out evaluation: no samples")
    groups = [list(feats[i : i + micro_batch_size]) for i in range(0, len(feats), micro_batch_size)]
    batches = trainer._assemble(groups)
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        denominators = sum(trainer.algorithm.count_targets(b, trainer.head) for b in batches)
        ctx = ObjectiveContext(loss=trainer.loss_fn, head=trainer.head, denominators=denominators.double())
        totals: dict[str, torch.Tensor] = {}
        for batch in batches:
            with trainer._autocast():
                _loss, stats = trainer._objective(batch, ctx)
            for name, value in stats.items():
                value = value.detach().double().cpu()
                totals[name] = value if name not in totals else totals[name] + value
    finally:
        trainer.model.train(was_training)
    return trainer.algorithm.summarize(totals)


def prompt_ids(sample: Sample) -> list[int]:
    """A held-out conversation's tokens before its first learned token (the prompt of its first reply)."""
    learned = sample.loss_mask.nonzero()
    end = int(learned[0]) if learned.numel() else sample.num_tokens
    return sample.input_ids[:end].tolist()


class Chain:
    """The real greedy chain: the draft exported to ``export_dir`` (the trainer's current weights),
    then ``evaluate`` (the hf engine, the algorithm's proposer) on ``prompts``; returns the chain's
    acceptance length (tokens per target forward)."""

    def __init__(self, trainer: Any, vocab: Any, export_dir: Any, target: str, prompts: list[list[int]],
                 steps: int, max_new_tokens: int):
        self.trainer, self.vocab, self.export_dir, self.target = trainer, vocab, export_dir, target
        self.prompts, self.steps, self.max_new_tokens = prompts, steps, max_new_tokens

    def __call__(self) -> float:
        from specforge_core.evaluation.evaluate import evaluate
        from specforge_core.export import export_draft

        export_draft(self.trainer.draft, self.vocab, self.export_dir, self.trainer.algorithm)
        # the target in the training dtype (fp32 on CPU, bf16 on GPU by default), loaded for each estimate
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.trainer.dtype, "fp32")
        report = evaluate(self.export_dir, self.target, self.prompts, steps=self.steps,
                          max_new_tokens=self.max_new_tokens, check=False, device=str(self.trainer.device),
                          batch_size=len(self.prompts), dtype=dtype)
        return float(report.overall.tau)


class HeldOut(Observer):
    """Runs ``held_out_metrics`` every ``every`` steps and at the last; ``features()`` gives the
    held-out samples' target features (called once, at the first evaluation). Put it before the
    observers that read the record's metrics (recorder, console, W&B)."""

    def __init__(self, trainer: Any, features: Callable[[], list[TargetFeatures]], every: int,
                 micro_batch_size: int, display: MetricDisplay, console: Any, chain: Optional[Chain] = None):
        self.trainer, self.features, self.every, self.chain = trainer, features, every, chain
        self.micro_batch_size, self.display, self.console = micro_batch_size, display, console
        self.feats: Optional[list[TargetFeatures]] = None
        self.last: Optional[tuple[int, float]] = None  # (step, headline value) of the previous estimate

    def on_step(self, record: StepRecord) -> None:
        if record.step % self.every and record.step != record.total_steps:
            return
        if self.feats is None:
            self.feats = self.features()
        m = held_out_metrics(self.trainer, self.feats, self.micro_batch_size)
        if self.chain is not None:
            m["chain_accept_len"] = self.chain()
        record.metrics.update({PREFIX + k: v for k, v in m.items()})
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
        chain = (f" | greedy chain tau {m['chain_accept_len']:.3f} on {len(self.chain.prompts)} prompts"
                 if self.chain is not None and "chain_accept_len" in m else "")
        return (f"held-out step {step}: " + " | ".join(shown) + change + chain
                + f" | {len(self.feats or [])} samples never trained on")


def observers_for(run: Any, trainer: Any, backend: Any) -> list[Observer]:
    """The local pipeline's held-out observer (none when ``training.eval_every`` is 0): the
    held-out samples' features come from the run's target backend (or feature cache)."""
    tr = run.config.training
    if not tr.eval_every:
        return []
    if not run.held_out:  # a one-sample dataset: nothing can be held out
        run.console.print("training.eval_every: the dataset has one usable sample; no held-out estimate")
        return []
    bs = run.config.inference.batch_size

    def features() -> list[TargetFeatures]:
        out: list[TargetFeatures] = []
        for start in range(0, len(run.held_out), bs):
            out.extend(backend.generate(run.held_out[start : start + bs]))
        return out

    named = capability(run.algorithm, "DraftAlgorithm.display_metrics")
    display = MetricDisplay(dict(named()) if named is not None else {})
    chain = None
    if tr.eval_chain_prompts:
        c = run.config
        chain = Chain(trainer, run.vocab, run.out_dir / "held_out_export", str(c.model.target),
                      [prompt_ids(s) for s in run.held_out[: tr.eval_chain_prompts]], c.eval.steps,
                      c.eval.max_new_tokens)
    return [HeldOut(trainer, features, tr.eval_every, tr.micro_batch_size, display, run.console, chain)]
