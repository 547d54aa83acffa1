"""Token-budget packing over ShareGPT's real length distribution (training/packing.py): every
step has one shape, each sample is trained exactly once, in its own document, within a bounded
wait, and rows are nearly full; and the real-length benchmark's harness runs on CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import torch

from specforge_core.training.packing import TokenBudgetPacker
from specforge_core.types import TargetFeatures

ROOT = Path(__file__).resolve().parents[1]


def _sample(i: int, n: int) -> TargetFeatures:
    ids = torch.full((n,), i, dtype=torch.long)  # the sample's id in every position: traceable
    return TargetFeatures(sample_id=str(i), input_ids=ids, loss_mask=torch.ones(n, dtype=torch.bool),
                          aux_hidden=torch.zeros(n, 3), final_hidden=torch.zeros(n, 1), target_argmax=ids)


def test_budget_steps_over_sharegpt_lengths_are_full_fixed_and_lose_nothing():
    data = [int(x) for x in json.loads((ROOT / "benchmarks/data/sharegpt_lengths.json").read_text())["lengths"]]
    rng = random.Random(0)
    lengths = [min(max(rng.choice(data), 8), 4096) for _ in range(600)]
    packer = TokenBudgetPacker(row_tokens=8192, rows_per_micro=1, n_micro=2)
    fed, trained, first_step, waits, real, positions = 0, [], {}, [], 0, 0
    for step in range(60):
        new = []
        while packer.pending_tokens() + sum(f.num_tokens for f in new) < packer.capacity + 8192:
            new.append(_sample(fed, lengths[fed]))
            first_step[fed] = step
            fed += 1
        batches = packer.step(new)
        assert [tuple(b.input_ids.shape) for b in batches] == [(1, 8192)] * 2
        for b in batches:
            docs = b.doc_ids[0]
            for d in docs.unique().tolist():
                if d < 0:
                    continue
                ids = b.input_ids[0, docs == d]
                i = int(ids[0])
                assert torch.equal(ids, torch.full_like(ids, i)) and ids.numel() == lengths[i]  # whole, unsplit
                assert torch.equal(b.position_ids[0, docs == d], torch.arange(lengths[i]))
                trained.append(i)
                waits.append(step - first_step[i])
            real += b.num_tokens
            positions += b.input_ids.numel()
    pending = [int(f.sample_id) for f in packer.pending]
    assert sorted(trained + pending) == list(range(fed))  # each sample once, none lost
    assert max(waits) <= 3
    assert real / positions > 0.95  # first-fit over a look-ahead of one row: ~2.5% padding


def test_varlen_benchmark_harness_runs_on_cpu(tmp_path):
    out = tmp_path / "v.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/varlen_step.py"), "--device", "cpu", "--tiny",
                        "--steps", "1", "--warmup", "1", "--variants", "fixed", "packed", "budget",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {x["variant"]: x for x in json.loads(out.read_text())["runs"]}
    assert all(x["status"] == "ok" for x in runs.values()), runs
    assert runs["budget"]["shapes"] == 1 and runs["budget"]["pad_frac"] < runs["packed"]["pad_frac"]
    assert "budget" in r.stdout.splitlines()[-1]  # the table is printed last
