"""``training.token_budget`` end to end: the plan covers every sample once per epoch in rows of one
shape, the real local pipeline trains it (hf backend, tiny real Llama), and an interrupted +
resumed run equals the uninterrupted one bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_core.config import load_config
from specforge_core.pipeline.local import run_local
from specforge_core.run.order import BudgetPlan, SampleOrder
from specforge_core.training.packing import budget_schedule

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


def test_budget_schedule_places_every_sample_once_in_fixed_rows():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(400)]
    order = list(range(400))
    rng.shuffle(order)
    steps = budget_schedule(lengths, order, row_tokens=512, n_rows=3)
    placed = [i for step in steps for row in step for i in row]
    assert sorted(placed) == list(range(400))  # each sample exactly once, none lost
    for step in steps:
        assert len(step) == 3 and all(sum(lengths[i] for i in row) <= 512 for row in step)
    full = steps[:-2]  # the epoch's tail may be short
    fill = sum(lengths[i] for s in full for r in s for i in r) / (len(full) * 3 * 512)
    assert fill > 0.9


def test_budget_plan_epochs_and_positions():
    lengths = [50, 120, 30, 200, 90, 10, 75]
    order = SampleOrder(len(lengths), seed=0, shuffle=True)
    plan = BudgetPlan.build(lengths, order, row_tokens=256, n_rows=2, num_epochs=2, max_steps=0)
    per_epoch = {0: [], 1: []}
    for s, pos in enumerate(plan.positions):
        per_epoch[pos["epoch"]] += plan.sample_indices(s)
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) == list(range(len(lengths)))
    assert [p["index"] for p in plan.positions if p["epoch"] == 0][-1] == len(lengths)
    capped = BudgetPlan.build(lengths, order, 256, 2, num_epochs=1, max_steps=len(plan.steps) + 3)
    assert len(capped.steps) == len(plan.steps) + 3 and capped.steps[: len(plan.steps)] == plan.steps


@pytest.fixture(scope="module")
def target_dir(tiny_chat_target):
    return tiny_chat_target


def config(tmp_path, target, out, *overrides):
    data = {
        "run": {"name": "budget", "output_dir": str(out), "seed": 5},
        "model": {"target": str(target), "draft_vocab_size": 256, "llama-eagle3": {"ttt_length": 2}},
        "dataset": {"path": [str(ASSETS / "data" / "sample_chat.jsonl")], "max_samples": 24,
                    "max_seq_length": 256, "cache_dir": str(tmp_path / "cache")},
        "training": {"num_epochs": 1, "micro_batch_size": 1, "gradient_accumulation": 2, "pack_tokens": 256,
                     "token_budget": True, "lr": 3e-3, "save_every": 2, "keep_checkpoints": 1},
        "logging": {"progress": False},
    }
    return load_config(data=data, overrides=list(overrides))


def test_token_budget_run_trains_every_sample_and_resumes_exactly(tmp_path, target_dir, capsys):
    full = run_local(config(tmp_path, target_dir, tmp_path / "full"))
    out = capsys.readouterr().out
    assert "token budget: 2 x 1 rows of 256 positions per step" in out
    acc = full.accounting
    assert acc["trained"] == acc["records_in"] - sum(v for k, v in acc.items() if k.startswith("skipped"))
    assert acc["skipped: not reached (max_steps)"] == 0
    # fewer steps than 2 samples per step would take, and every step the same shape: 2 rows x 256
    n_usable = acc["trained"]
    assert full.steps < n_usable / 2
    for m in full.history[:-1]:
        assert m["tokens"] > 0.8 * 2 * 256  # rows nearly full (the last step may be the tail)

    first = run_local(config(tmp_path, target_dir, tmp_path / "split"), stop_after_steps=2)
    assert first.steps == 2
    second = run_local(config(tmp_path, target_dir, tmp_path / "split", "training.resume=true"))
    assert second.steps == full.steps and len(second.history) == full.steps - 2
    assert second.accounting == full.accounting
    a, b = load_file(str(full.checkpoint / "model.safetensors")), load_file(str(second.checkpoint / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(full.history[2:], second.history, strict=True):
        assert x["tokens"] == y["tokens"] and x["loss"] == y["loss"]



def test_resume_with_a_different_plan_is_refused(tmp_path):
    """A checkpoint whose data position is not this config's plan after the same step (the data
    changed; the run dir's config check catches changed settings first) is refused by name."""
    from specforge_core.run.order import check_budget_position as _check_budget_position

    plan = BudgetPlan.build([50, 120, 30, 200], SampleOrder(4, 0, True), 256, 1, num_epochs=1, max_steps=0)
    _check_budget_position(plan, 1, plan.positions[0], tmp_path / "step-000001")  # the same plan: fine
    with pytest.raises(ValueError, match=r"step-000001: data position .* token-budget plan"):
        _check_budget_position(plan, 1, {"epoch": 0, "index": 3}, tmp_path / "step-000001")


def test_token_budget_needs_pack_tokens(tmp_path, target_dir):
    with pytest.raises(ValueError, match="token_budget = true needs training.pack_tokens"):
        run_local(config(tmp_path, target_dir, tmp_path / "x", "training.pack_tokens=0"))
