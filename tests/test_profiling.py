"""StepProfiler on CPU: a tiny training loop writes a Chrome trace (JSON with the traced steps'
ops) and a TensorBoard trace; disabled, it writes nothing."""

from __future__ import annotations

import json

import torch

from specforge_core.config.schema import ProfilerSection
from specforge_core.profiling import StepProfiler


def _train(prof: StepProfiler, steps: int) -> None:
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with prof:
        for _ in range(steps):
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            prof.step()


def test_trace_written_for_the_configured_steps(tmp_path):
    section = ProfilerSection(enabled=True, start_step=2, num_steps=2, output_dir="{output_dir}/traces")
    prof = StepProfiler(section, str(tmp_path), rank=0)
    _train(prof, steps=6)
    assert len(prof.traces) == 1
    trace = prof.traces[0]
    assert trace.parent == tmp_path / "traces" and trace.exists()
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    # exactly the two active steps are in the trace, and the ops run inside them
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3"}
    assert any("addmm" in n or "linear" in n for n in names)
    tb = list((tmp_path / "traces" / "tensorboard").glob("rank0*.pt.trace.json"))
    assert len(tb) == 1 and json.loads(tb[0].read_text())["traceEvents"]


def test_disabled_profiler_writes_nothing(tmp_path):
    prof = StepProfiler(ProfilerSection(enabled=False, output_dir=str(tmp_path / "t")), str(tmp_path))
    _train(prof, steps=3)
    assert prof.traces == [] and not (tmp_path / "t").exists()
