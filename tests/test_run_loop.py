"""The step loop and its observers (``specforge_core.run``) on a real one-parameter trainer: the
order of hooks, stop requests, the final checkpoint rule, and the console line each algorithm's
``display_metrics`` names (checked against the real llama-eagle3 and dflash algorithms)."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from specforge_core.config import load_config
from specforge_core.run.loop import StepBatch, StepLoop
from specforge_core.run.observers import Checkpoints, Observer, StepRecord, StopAfter
from specforge_core.run.observers import Console as ConsoleObserver
from specforge_core.run.recipe import metric_display


class LinearTrainer:
    """The part of ``Trainer`` the loop uses, over a real parameter: one SGD step per batch."""

    def __init__(self, total_steps: int):
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.opt = torch.optim.SGD([self.w], lr=0.1)
        self.step, self.total_steps = 0, total_steps

    def train_step(self, micro):
        self.opt.zero_grad()
        loss = sum((self.w - x) ** 2 for x in micro)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "tokens_per_s": 1.0, "lr": 0.1, "grad_norm": 0.0}


class Source:
    def __init__(self, steps: int):
        self.steps, self.acked = steps, []

    def __iter__(self):
        for s in range(self.steps):
            yield StepBatch([torch.tensor(1.0)], {"epoch": 0, "index": s + 1}, {"data_wait_s": 0.0}, tag=s)

    def trained(self, batch):
        self.acked.append(batch.tag)


class Log(Observer):
    def __init__(self, events):
        self.events = events

    def on_start(self, start_step, total_steps):
        self.events.append(("start", start_step, total_steps))

    def on_step(self, record: StepRecord):
        self.events.append(("step", record.step, record.position["index"]))

    def on_end(self, finished):
        self.events.append(("end", finished))


def test_loop_calls_every_hook_in_order_and_checkpoints_the_end():
    t, events, saved = LinearTrainer(3), [], []
    ckpt = Checkpoints(lambda pos: saved.append(pos) or f"ckpt-{pos['index']}", save_every=2, step=0)
    source = Source(3)
    assert StepLoop(t, source, [Log(events), ckpt]).run() is True
    assert events == [("start", 0, 3), ("step", 1, 1), ("step", 2, 2), ("step", 3, 3), ("end", True)]
    assert source.acked == [0, 1, 2]
    assert [p["index"] for p in saved] == [2, 3]  # every save_every steps, and the end (not saved twice)
    assert ckpt.last == "ckpt-3"
    assert 0.0 < float(t.w) < 1.0  # it trained


def test_stop_request_ends_early_without_a_final_checkpoint():
    t, events, saved = LinearTrainer(5), [], []
    ckpt = Checkpoints(lambda pos: saved.append(pos) or "c", save_every=0, step=0)
    assert StepLoop(t, Source(5), [Log(events), ckpt, StopAfter(2)]).run() is False
    assert t.step == 2 and events[-1] == ("end", False) and saved == []


def test_a_step_that_raises_still_ends_every_observer():
    class Broken(LinearTrainer):
        def train_step(self, micro):
            raise RuntimeError("boom")

    events = []
    try:
        StepLoop(Broken(2), Source(2), [Log(events)]).run()
    except RuntimeError:
        pass
    assert events == [("start", 0, 2), ("end", False)]


def test_console_shows_the_metrics_the_algorithm_names(tmp_path):
    from specforge_core.build import algorithm

    eagle = load_config(data={"model": {"draft": "llama-eagle3", "llama-eagle3": {"ttt_length": 3}}})
    dflash = load_config(data={"model": {"draft": "dflash", "dflash": {"block_size": 5}}})
    m = {"step": 4, "loss": 1.5, "tokens_per_s": 10.0, "lr": 1e-3, "grad_norm": 0.5, "accept_len": 2.25,
         **{f"acc_{k}": 0.1 * (k + 1) for k in range(8)}}
    for cfg, accs, head in ((eagle, "0.10 0.20 0.30", "acc_0 0.10"), (dflash, "0.20 0.30 0.40 0.50", "acc_1 0.20")):
        display = metric_display(algorithm(cfg))
        line = display.line(m, 10)
        assert line.startswith(f"step 4/10 | loss 1.5000 | acc {accs} | tau 2.25 | 10 tok/s"), line
        assert display.bar(m) == f"loss 1.500 {head}"
        out = io.StringIO()
        console = ConsoleObserver(Console(file=out, width=200), display, log_every=2, progress=False)
        console.on_start(0, 10)
        console.on_step(StepRecord(4, 10, m))
        console.on_end(True)
        printed = out.getvalue().strip()
        assert printed.startswith(line.split(" | lr ")[0]) and printed.endswith("lr 1.00e-03 | gnorm 0.500")


def test_console_reports_the_runs_own_rate_beside_the_steps(monkeypatch):
    """`run tok/s` = tokens of the steps since the last line / wall time since it: a slow target or
    checkpoint between steps shows there, not in train_step's `tok/s`."""
    import specforge_core.run.observers as observers
    from specforge_core.build import algorithm

    clock = iter([10.0, 14.0, 30.0])  # on_start, the line at step 2, the line at step 4
    monkeypatch.setattr(observers.time, "time", lambda: next(clock))
    out = io.StringIO()
    display = metric_display(algorithm(load_config(data={"model": {"draft": "llama-eagle3"}})))
    console = ConsoleObserver(Console(file=out, width=200), display, log_every=2, progress=False)
    console.on_start(0, 4)
    for step, tokens in ((1, 100.0), (2, 300.0), (3, 500.0), (4, 300.0)):
        m = {"step": step, "loss": 1.0, "tokens": tokens, "tokens_per_s": 999.0, "lr": 1e-3, "grad_norm": 0.5}
        console.on_step(StepRecord(step, 4, m))
    lines = out.getvalue().strip().splitlines()
    assert [ln.split(" | ")[3] for ln in lines] == ["run 100 tok/s", "run 50 tok/s"]  # 400/4 s, 800/16 s


def test_console_rate_uses_the_steps_own_end_times_when_records_arrive_in_bursts(monkeypatch):
    """The Ray driver reads rank 0's records in bursts: their ``time`` stamps (set where the step
    ran), not the moment they are printed, give the run's rate."""
    import specforge_core.run.observers as observers
    from specforge_core.build import algorithm

    monkeypatch.setattr(observers.time, "time", lambda: 100.0)  # every record arrives at once
    out = io.StringIO()
    display = metric_display(algorithm(load_config(data={"model": {"draft": "llama-eagle3"}})))
    console = ConsoleObserver(Console(file=out, width=200), display, log_every=2, progress=False)
    console.on_start(0, 4)
    for step, stamp in ((1, 102.0), (2, 104.0), (3, 106.0), (4, 108.0)):
        m = {"step": step, "loss": 1.0, "tokens": 200.0, "tokens_per_s": 999.0, "lr": 1e-3, "grad_norm": 0.5,
             "time": stamp}
        console.on_step(StepRecord(step, 4, m))
    lines = out.getvalue().strip().splitlines()
    assert [ln.split(" | ")[3] for ln in lines] == ["run 100 tok/s", "run 100 tok/s"]  # 400 tokens / 4 s each
