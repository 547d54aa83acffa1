"""``[profiler]``: trace a few optimizer steps with the PyTorch profiler.

    with StepProfiler(config.profiler, config.output_dir) as prof:
        for batch in loader:
            ...                 # forward, backward, optimizer.step()
            prof.step()         # once per optimizer step

Steps ``start_step .. start_step + num_steps - 1`` (0-based optimizer steps) are recorded; the
steps before are skipped (start-up, compilation) except the last one, which warms the profiler up.
Each trace is a Chrome-trace JSON written by ``tensorboard_trace_handler`` into ``tensorboard/``
(for ``tensorboard --logdir`` with the torch-tb-profiler plugin) and copied to
``trace_rank<r>_step<s>.json`` (open it at https://ui.perfetto.dev or chrome://tracing). Disabled, the context does nothing and costs nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, section: Any, output_dir: str = "", rank: Optional[int] = None) -> None:
        self.enabled = bool(section.enabled)
        self.start_step = int(section.start_step)
        self.num_steps = int(section.num_steps)
        self.dir = Path(str(section.output_dir).replace("{output_dir}", output_dir or "."))
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.traces: list[Path] = []  # Chrome traces written so far
        self._prof = None

    def __enter__(self) -> StepProfiler:
        if not self.enabled:
            return self
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        tensorboard = tensorboard_trace_handler(str(self.dir / "tensorboard"), worker_name=f"rank{self.rank}")

        tb_dir = self.dir / "tensorboard"

        def on_trace_ready(prof: Any) -> None:
            # A kineto trace can be saved only once: the TensorBoard handler writes it (Chrome JSON
            # under a timestamped name) and the stable-named copy is for Perfetto / chrome://tracing.
            before = set(tb_dir.glob("*.json")) if tb_dir.exists() else set()
            tensorboard(prof)
            written = sorted(set(tb_dir.glob("*.json")) - before, key=lambda p: p.stat().st_mtime)
            path = self.dir / f"trace_rank{self.rank}_step{prof.step_num}.json"
            if written:
                shutil.copyfile(written[-1], path)
                self.traces.append(path)
                log.info("profiler: wrote %s and %s", path, written[-1])

        # wait until one step before start_step, warm up on it, then record num_steps steps once
        warmup = 1 if self.start_step > 0 else 0
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=self.start_step - warmup, warmup=warmup, active=self.num_steps, repeat=1),
            on_trace_ready=on_trace_ready,
            record_shapes=True,
            with_stack=False,
        )
        self._prof.__enter__()
        return self

    def step(self) -> None:
        """Call after each optimizer step."""
        if self._prof is not None:
            self._prof.step()

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None
