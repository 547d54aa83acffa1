"""``Run``: one training run in three phases, the recipe every pipeline follows.

    prepare   checks -> output_dir lock, claim, resume check -> config.toml -> aux layers, seeds
              -> samples -> vocab -> step plan (token budget) -> resume position -> banner
    train     ``loop.StepLoop``: a batch source -> ``Trainer.train_step`` -> observers (console
              and progress, W&B, profiler, checkpoints, stop requests)
    wrap up   final checkpoint (an observer), export, sample accounting, closing lines

A pipeline is a thin driver of this class: ``pipeline/local.py`` runs the loop in process,
the Ray pipeline runs it inside each trainer actor with a batch source fed by the controller (its
console and W&B observers run on the driver, fed the controller's metrics).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import attrs
import torch
from rich.console import Console

from specforge_core import rundir
from specforge_core.build import algorithm as build_algorithm
from specforge_core.checks import check_config
from specforge_core.components import capability
from specforge_core.config import ConfigError, dump_toml
from specforge_core.config.schema import SpecforgeConfig
from specforge_core.data.usable import load_training_samples
from specforge_core.export import export_draft
from specforge_core.run import observers as obs
from specforge_core.run.accounting import account, print_run_end
from specforge_core.run.held_out import split_held_out
from specforge_core.run.order import StepPlan
from specforge_core.run.vocab import load_or_build_vocab
from specforge_core.target import with_aux_layers
from specforge_core.training.checkpoint import checkpoint_root

log = logging.getLogger(__name__)


@attrs.define
class RunResult:
    output_dir: Path
    steps: int  # optimizer steps done (in total, including those before a resume)
    history: list[dict[str, float]]  # metrics of the steps this call ran
    checkpoint: Optional[Path]
    export_dir: Optional[Path]
    accounting: dict[str, int]  # samples in / trained / skipped by reason
    wall_s: float


def check_before_run(config: SpecforgeConfig, registry: Any = None) -> None:
    """``checks.check_config``, the same checks as ``config validate``: errors raise, warnings log."""
    problems = check_config(config, registry=registry)
    for p in problems:
        if p.level != "error":
            log.warning("%s", p)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise ConfigError("; ".join(str(p) for p in errors) + " (specforge config validate lists every problem)")


def metric_display(algorithm: Any) -> obs.MetricDisplay:
    """The metrics the draft algorithm names for the console (``DraftAlgorithm.display_metrics``)."""
    named = capability(algorithm, "DraftAlgorithm.display_metrics")
    return obs.MetricDisplay(dict(named()) if named is not None else {})


class Run:
    """One run of ``config``. Use as a context manager: leaving it releases everything it opened
    (the output_dir lock, observers), also when a step raises."""

    def __init__(self, config: SpecforgeConfig, *, registry: Any = None, console: Any = None):
        self.t0 = time.perf_counter()
        self.config = config
        self.registry = registry
        self.console = console or Console(soft_wrap=True)  # log lines stay whole in files and CI logs
        self.out_dir = Path(config.output_dir)
        self.cleanup = contextlib.ExitStack()
        self.algorithm = build_algorithm(config, registry)
        self.config_toml = ""
        self.seen: set[int] = set()  # indices into `usable` trained at least once
        self.start_step = 0

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup.close()

    # ================================================================================== prepare
    def claim_output_dir(self) -> None:
        """One run per output_dir; a fresh run never mixes with another run's checkpoints, a
        resumed one checks its config against the checkpoint's."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cleanup.enter_context(rundir.lock(self.out_dir, warn=self.console.print))
        rundir.claim(self.out_dir, self.config.training.resume, self.config.run.name)
        if self.config.training.resume:
            rundir.check_resume(self.config, dump_toml(self.config), warn=self.console.print)

    def write_config(self, config: Optional[SpecforgeConfig] = None) -> str:
        """``<output_dir>/config.toml``: the config as the user wrote it (aux layers unset), after
        the pipeline settled its own choices (``config``, e.g. the Ray pipeline's store)."""
        if config is not None:
            self.config = config
        self.config_toml = dump_toml(self.config)
        (self.out_dir / "config.toml").write_text(self.config_toml)
        return self.config_toml

    def load_data(self) -> None:
        """Aux layers (unset = the draft algorithm's default for this target; the backend, the
        trainer and the export read the list filled in here), seeds, tokenized samples."""
        self.config = with_aux_layers(self.config, self.registry)
        random.seed(self.config.run.seed)
        torch.manual_seed(self.config.run.seed)
        self.samples, self.usable, self.data_stats, self.skipped = load_training_samples(
            self.config, self.console, self.algorithm.features)
        self.held_out: list = []  # training.eval_every: samples never trained (run.held_out)
        if self.config.training.eval_every:
            self.usable, self.held_out = split_held_out(self.usable, self.config.training.eval_samples,
                                                        self.config.run.seed)
            self.skipped["held out for evaluation (training.eval_every)"] = len(self.held_out)

    def plan_steps(self, target_vocab_size: int, ranks: int = 1) -> None:
        """The vocab mapping (``vocab_path``: trainer processes load it) and the step plan."""
        self.vocab, self.vocab_path = load_or_build_vocab(self.config, self.usable, target_vocab_size, self.console)
        c = self.config
        self.plan = StepPlan(c.training, [s.num_tokens for s in self.usable], c.run.seed, c.dataset.shuffle, ranks)

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    def resume_at(self, step: int, position: Optional[dict], checkpoint: Optional[Path]) -> None:
        """The trainer(s) loaded ``checkpoint`` (after ``step``, data ``position``); None: a fresh start."""
        if checkpoint is None:
            if self.config.training.resume:
                self.console.print(f"training.resume: no complete checkpoint under "
                                   f"{checkpoint_root(self.out_dir)}; starting fresh")
            return
        self.seen |= self.plan.resume(step, position, checkpoint)
        self.start_step = step
        self.console.print(f"resumed from {checkpoint} (step {step}, data position {position})")

    def banner(self, where: str) -> None:
        self.console.print(f"training: {len(self.usable)} samples, {self.plan.shape}, {self.total_steps} steps, "
                           f"draft {self.config.model.draft}, {where}")

    # ================================================================================== train
    def observers(self) -> list[obs.Observer]:
        """The observers that read metrics only: the recorder (``history``), console and progress
        bar, W&B. They run where the metrics are (the Ray driver: fed by the controller)."""
        self.recorder = obs.Recorder()
        out: list[obs.Observer] = [self.recorder,
                                   obs.Console(self.console, metric_display(self.algorithm),
                                               self.config.training.log_every, self.config.logging.progress)]
        if self.config.logging.wandb:
            out.append(obs.WandB(self.config, self.config_toml))
        return out

    # ================================================================================== wrap up
    def finish(self, steps: int, last_ckpt: Optional[Path], export_dir: Optional[Path],
               extra_skipped: Optional[Counter] = None, not_planned: int = 0) -> RunResult:
        """Sample accounting (every record read is trained or skipped for a reason) and the closing
        lines. ``extra_skipped``: the pipeline's own reasons; ``not_planned``: usable samples among
        them (never reachable by this run)."""
        skipped = Counter(self.skipped)
        skipped.update(extra_skipped or {})
        accounting = account(self.data_stats, len(self.samples), skipped, len(self.usable) - not_planned, self.seen)
        wall = print_run_end(self.console, accounting, last_ckpt, export_dir, self.t0)
        return RunResult(self.out_dir, steps, list(self.recorder.history), last_ckpt, export_dir, accounting, wall)


@attrs.define
class TrainerObservers:
    """The observers that run next to a trainer (every rank): profiler, checkpoints, stop requests."""

    checkpoints: obs.Checkpoints
    others: list[obs.Observer]

    @classmethod
    def build(cls, config: SpecforgeConfig, trainer: Any, save: Any, position: Optional[dict], rank: int = 0,
              stop_after_steps: Optional[int] = None) -> TrainerObservers:
        """``save(position) -> checkpoint dir``; ``position``: the data position at the trainer's step."""
        others: list[obs.Observer] = []
        if config.profiler.enabled:
            others.append(obs.Profile(config.profiler, str(config.output_dir), rank))
        if stop_after_steps is not None:
            others.append(obs.StopAfter(stop_after_steps))
        return cls(obs.Checkpoints(save, config.training.save_every, trainer.step, position), others)

    def all(self) -> list[obs.Observer]:
        return [self.checkpoints, *self.others]


def export_trained(trainer: Any, info: Any, vocab: Any, out_dir: Path, rank: int = 0) -> Optional[Path]:
    """The trained draft, exported by rank 0 (``<out_dir>``). Several ranks gather the full
    state first (a collective: every rank calls this)."""
    if trainer.strategy.world_size == 1:
        return export_draft(trainer.draft, vocab, out_dir, trainer.algorithm) if rank == 0 else None
    state = trainer.strategy.full_state_dict(trainer.model)
    out = None
    if rank == 0:
        draft = trainer.algorithm.build(info, vocab)
        state = {k.removeprefix("draft."): v for k, v in state.items()}  # trainer.DraftStep's prefix
        _missing, unexpected = draft.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"export: unexpected keys in the gathered state: {unexpected}")
        out = export_draft(draft, vocab, out_dir, trainer.algorithm)
    trainer.strategy.barrier()
    return out
