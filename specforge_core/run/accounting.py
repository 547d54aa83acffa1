"""Sample accounting: every record read is trained (at least once) or skipped for a named reason."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional


def account(data_stats: Any, n_samples: int, skipped: Counter, n_usable: int, seen: set[int]) -> dict[str, int]:
    """``data_stats``: the data loader's counts; ``n_samples`` tokenized samples of which
    ``n_usable`` have something to learn; ``skipped``: further reasons; ``seen``: usable indices trained."""
    acc = {
        "records_in": data_stats.lines,
        "trained": len(seen),
        "skipped: no assistant turn": data_stats.skipped_no_assistant,
        "skipped: malformed": data_stats.skipped_malformed,
        "skipped: nothing to learn after truncation": data_stats.skipped_no_loss,
        "skipped: over dataset.max_samples": data_stats.lines - n_samples - data_stats.skipped_no_assistant
        - data_stats.skipped_malformed - data_stats.skipped_no_loss,
        **{f"skipped: {k}": v for k, v in skipped.items()},
        "skipped: not reached (max_steps)": n_usable - len(seen),
    }
    total = acc["trained"] + sum(v for k, v in acc.items() if k.startswith("skipped"))
    if total != acc["records_in"]:
        raise RuntimeError(f"sample accounting does not add up: {acc}")
    return acc


def format_accounting(acc: dict[str, int]) -> str:
    skips = ", ".join(f"{v} {k[len('skipped: '):]}" for k, v in acc.items() if k.startswith("skipped") and v)
    return f"samples: {acc['records_in']} in = {acc['trained']} trained + skipped ({skips or 'none'})"


def print_run_end(console: Any, accounting: Any, last_ckpt: Optional[Path], export_dir: Optional[Path],
                  t0: float) -> float:
    """The closing lines of every run: accounting, checkpoint, export, wall time."""
    console.print(format_accounting(accounting))
    if last_ckpt is not None:
        console.print(f"checkpoint: {last_ckpt}")
    if export_dir is not None:
        console.print(f"export: {export_dir}")
    wall = time.perf_counter() - t0
    console.print(f"done in {wall:.1f} s")
    return wall
