"""Observers: what happens around each optimizer step, each in one small class.

The step loop (``loop.StepLoop``) calls every observer's hooks in order::

    on_start(start_step, total_steps)   before the first step of this call
    on_step(record)                     after each optimizer step (``StepRecord``)
    on_end(finished)                    once, also when a step raised (finished=False then)

and stops after a step once any observer's ``stop_requested`` is true. ``Observer`` is the base
with no-op hooks; an observer overrides what it needs. Observers that only read metrics (console,
W&B, the recorder) run wherever the metrics are (the Ray driver gets them from the controller);
observers that touch the trainer (checkpoints, profiler) run next to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import attrs

from specforge_core.profiling import StepProfiler


@attrs.frozen
class StepRecord:
    step: int  # optimizer steps done (1-based after the step)
    total_steps: int
    metrics: dict[str, float]  # the trainer's and the algorithm's metrics of this step
    position: Optional[dict[str, int]] = None  # data position after this step (checkpoints record it)


class Observer:
    """Base class: every hook optional (see the module doc)."""

    stop_requested: bool = False

    def on_start(self, start_step: int, total_steps: int) -> None:
        pass

    def on_step(self, record: StepRecord) -> None:
        pass

    def on_end(self, finished: bool) -> None:
        pass


# ------------------------------------------------------------------------------------ metrics
@attrs.frozen
class MetricDisplay:
    """Which metrics the console shows: ``groups`` maps a label to the metric names printed after
    it (``{"acc": ["acc_0", "acc_1"], "tau": ["accept_len"]}``); the first name of the first group
    is the progress bar's headline. The draft algorithm names them (``display_metrics``)."""

    groups: dict[str, list[str]] = attrs.field(factory=dict)

    @property
    def headline(self) -> Optional[str]:
        return next((names[0] for names in self.groups.values() if names), None)

    def line(self, m: dict[str, float], total_steps: int, run_tokens_per_s: Optional[float] = None) -> str:
        shown = []
        for label, names in self.groups.items():
            values = " ".join(f"{m[n]:.2f}" for n in names if n in m)
            if values:
                shown.append(f"{label} {values} | ")
        return (
            f"step {int(m['step'])}/{total_steps} | loss {m['loss']:.4f} | " + "".join(shown)
            + f"{m['tokens_per_s']:.0f} tok/s | "
            + (f"run {run_tokens_per_s:.0f} tok/s | " if run_tokens_per_s is not None else "")
            + f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f}"
            + (f" | data wait {m['data_wait_s'] * 1e3:.0f} ms" if "data_wait_s" in m else "")
        )

    def bar(self, m: dict[str, float]) -> str:
        head = self.headline
        return f"loss {m['loss']:.3f}" + (f" {head} {m[head]:.2f}" if head and head in m else "")


class Console(Observer):
    """The metric line every ``log_every`` steps (and at the last) and the progress bar."""

    def __init__(self, console: Any, display: MetricDisplay, log_every: int, progress: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console, self.display, self.log_every = console, display, log_every
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console, disable=not progress,
        )
        self.task: Any = None
        # tokens and wall time since the last printed line: the run's own rate (target inference,
        # data, checkpoints included), beside train_step's
        self._tokens, self._since = 0.0, 0.0

    def on_start(self, start_step: int, total_steps: int) -> None:
        self._tokens, self._since = 0.0, time.time()
        self.bar.start()
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")

    def on_step(self, record: StepRecord) -> None:
        m = record.metrics
        self.bar.update(self.task, completed=record.step, info=self.display.bar(m))
        self._tokens += m.get("tokens", 0.0)
        if record.step % self.log_every == 0 or record.step == record.total_steps:
            # where the step ran: a step's own end time when it carries one (the Ray trainers stamp
            # ``time``; the driver reads their records in bursts), else now, right after the step
            now = m["time"] if "time" in m else time.time()
            run_rate = self._tokens / max(now - self._since, 1e-9)
            self._tokens, self._since = 0.0, now
            self.bar.console.print(self.display.line(m, record.total_steps, run_rate))

    def on_end(self, finished: bool) -> None:
        self.bar.stop()


class Recorder(Observer):
    """Keeps every step's metrics (``RunResult.history``)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_step(self, record: StepRecord) -> None:
        self.history.append(record.metrics)


class WandB(Observer):
    """``logging.wandb``: every step's metrics under ``train/`` (``wandb_mode = "offline"`` needs
    no network; the run directory goes into ``output_dir``)."""

    def __init__(self, config: Any, config_toml: str):
        import wandb  # an optional dependency: imported only when logging.wandb is on

        self.run = wandb.init(
            project=config.logging.wandb_project, name=config.run.name, mode=config.logging.wandb_mode,
            dir=str(config.output_dir), config=_toml(config_toml),
        )

    def on_step(self, record: StepRecord) -> None:
        self.run.log({f"train/{k}": v for k, v in record.metrics.items() if k != "step"}, step=record.step)

    def on_end(self, finished: bool) -> None:
        self.run.finish()


def _toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


# ------------------------------------------------------------------------------------ trainer side
class Profile(Observer):
    """``[profiler]``: traces of the configured steps (``profiling.StepProfiler``), per rank."""

    def __init__(self, section: Any, output_dir: str, rank: Optional[int] = None):
        self.profiler = StepProfiler(section, output_dir, rank)

    def on_start(self, start_step: int, total_steps: int) -> None:
        self.profiler.__enter__()

    def on_step(self, record: StepRecord) -> None:
        self.profiler.step()

    def on_end(self, finished: bool) -> None:
        self.profiler.__exit__(None, None, None)


class Checkpoints(Observer):
    """``training.save_every``: a checkpoint every N steps, and one at the end of a finished run
    (unless that step was just saved). ``save(position)`` writes one and returns its directory."""

    def __init__(self, save: Callable[[Optional[dict]], Path], save_every: int, step: int,
                 position: Optional[dict] = None):
        self.save, self.save_every = save, save_every
        self.step, self.position = step, position  # where the run stands (start: the resume point)
        self.saved_step: Optional[int] = None
        self.last: Optional[Path] = None

    def on_step(self, record: StepRecord) -> None:
        self.step, self.position = record.step, record.position
        if self.save_every and record.step % self.save_every == 0:
            self._save()

    def on_end(self, finished: bool) -> None:
        if finished and self.saved_step != self.step and self.position is not None:
            self._save()

    def _save(self) -> None:
        self.last = self.save(self.position)
        self.saved_step = self.step


class StopAfter(Observer):
    """Ends the loop after ``steps`` steps of this call, as if killed (tests of resume)."""

    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def on_step(self, record: StepRecord) -> None:
        self.done += 1
        self.stop_requested = self.done >= self.steps
