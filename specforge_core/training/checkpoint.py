"""Step checkpoints under ``<output_dir>/checkpoints/step-NNNNNN/`` and exact resume.

The strategy writes model + optimizer + ``extra`` atomically and marks a finished directory with a
``COMPLETE`` file; ``latest_checkpoint`` only ever returns such a directory, so a run killed while
saving resumes from the previous one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

COMPLETE = "COMPLETE"  # every strategy writes it last into a finished checkpoint directory
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_complete(path: str | Path) -> bool:
    """``path`` is a finished checkpoint directory (its ``COMPLETE`` marker was written)."""
    return (Path(path) / COMPLETE).is_file()


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:06d}"


def _complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and is_complete(d):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint directory, or None."""
    found = _complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    trainer: Any,  # Eagle3Trainer
    output_dir: str | Path,
    *,
    data_position: dict[str, int],
    config_toml: str,
    vocab_path: str,
    keep: int,
) -> Path:
    """Checkpoint ``trainer`` at its current step; prune to the ``keep`` newest complete ones."""
    path = checkpoint_dir(output_dir, trainer.step)
    extra = {
        **trainer.state(),
        "data_position": dict(data_position),
        "rng": rng_state(),
        "config_toml": config_toml,
        "vocab_mapping": str(vocab_path),
    }
    trainer.strategy.save_checkpoint(str(path), trainer.model, trainer.optimizer, extra)
    if trainer.strategy.rank == 0:
        for _, old in _complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.strategy.barrier()
    return path


def load(trainer: Any, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, step and RNG; returns the checkpoint's ``extra``."""
    extra = trainer.strategy.load_checkpoint(str(path), trainer.model, trainer.optimizer)
    trainer.load_state(extra)
    set_rng_state(extra["rng"])
    return extra
