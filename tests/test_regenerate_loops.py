"""Degenerate (looping) replies in `specforge data regenerate`: ``loop_length`` against a brute-force
reference, and a real regeneration on the tiny target drops exactly the conversations one of whose
replies ends in a loop, counting them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from specforge_core.build import create
from specforge_core.config import load_config
from specforge_core.data.regenerate import loop_length, regenerate
from specforge_core.target import with_aux_layers

ROOT = Path(__file__).resolve().parents[1]


def brute_loop(ids: list[int], max_period: int = 64) -> tuple[int, int]:
    """Every period and every tail length: the tail equals its first period repeated."""
    best = (0, 0)
    for p in range(1, max_period + 1):
        for tail in range(len(ids), 3 * p - 1, -1):
            seg = ids[len(ids) - tail:]
            if tail >= 3 * p and all(seg[j] == seg[j % p] for j in range(tail)):
                if tail > best[1]:
                    best = (p, tail)
                break
    return best


def test_loop_length_equals_brute_force():
    rng = random.Random(0)
    cases = [[], [5], [1, 1], [1, 1, 1], [1, 2, 1, 2, 1, 2], [7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1]]
    for _ in range(300):
        head = [rng.randrange(50) for _ in range(rng.randrange(0, 20))]
        unit = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        cases.append(head + unit * rng.randrange(0, 6) + unit[: rng.randrange(len(unit) + 1)])
    for ids in cases:
        assert loop_length(ids)[1] == brute_loop(ids)[1], ids
    assert loop_length([9] + [1, 2, 3] * 10) == (3, 30)


class Recording:
    """The real hf backend, keeping every reply it generated."""

    def __init__(self, backend):
        self.backend, self.replies = backend, []

    def generate_text(self, prompts, params):
        out = self.backend.generate_text(prompts, params)
        # the check reads a reply without the end-of-turn token that ended it
        self.replies.extend(list(g.token_ids)[: -1 if g.finish_reason == "stop" else None] for g in out)
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


def _config(tmp_path, out, loop_tokens, target):
    return load_config([ROOT / "configs" / "quickstart.toml"], overrides=[
        f"run.output_dir={tmp_path / 'run'}", f"model.target={target}",
        f"dataset.path=['{ROOT / 'configs' / 'assets' / 'data' / 'sample_chat.jsonl'}']",
        f"regenerate.output={out}", "regenerate.batch_size=8", "regenerate.max_new_tokens=40",
        f"regenerate.loop_tokens={loop_tokens}", "logging.progress=false", "dataset.max_samples=8",
    ])


def test_looping_replies_drop_their_conversation_and_are_counted(tmp_path, tiny_chat_target):
    # a random tiny Llama (conftest): its greedy replies loop, as a real target's do on some prompts
    keep = _config(tmp_path, tmp_path / "all.jsonl", 0, tiny_chat_target)
    full = with_aux_layers(keep)
    backend = Recording(create(full, "target_backend", full, None))
    try:
        first = regenerate(keep, backend=backend)
        loops = [brute_loop(r)[1] for r in backend.replies]
        drop = _config(tmp_path, tmp_path / "dropped.jsonl", 12, tiny_chat_target)
        backend.replies = []
        second = regenerate(drop, backend=backend)
    finally:
        backend.backend.close()
    assert "degenerate" not in first
    recs = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()[1:]]
    kept = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()[1:]]
    n_loop = sum(r["status"].startswith("degenerate") for r in recs)
    assert second.get("degenerate", 0) == n_loop
    assert any(t >= 12 for t in loops) == (n_loop > 0)
    assert n_loop > 0, "the tiny target's greedy replies should loop somewhere (the test would not bite)"
    for a, b in zip(kept, recs, strict=True):
        if b["status"].startswith("degenerate"):
            assert b["conversations"] == []
        else:  # every other record is unchanged by the check
            assert a == b
