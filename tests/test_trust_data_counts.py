"""Counts that explain themselves: every data summary line adds up (records in = samples + each
skip reason, dataset.max_samples included); `specforge vocab` shows progress while it tokenizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from specforge_core.config import load_config
from specforge_core.data import build as build_mod
from specforge_core.data import build_samples, load_tokenizer
from specforge_core.vocab import build_vocab_for_config, count_loss_tokens

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


def _numbers(summary: str) -> dict[str, int]:
    m = re.fullmatch(r"(\d+) samples from (\d+) records(?: \(dataset.max_samples: the first (\d+) of (\d+) "
                     r"tokenized\))?; skipped: (\d+) without assistant turn, (\d+) malformed, (\d+) empty after "
                     r"truncation; (\d+) truncated", summary)
    assert m, summary
    keys = ("samples", "records", "first", "of", "no_assistant", "malformed", "no_loss", "truncated")
    return {k: int(v) if v is not None else None for k, v in zip(keys, m.groups(), strict=True)}


def test_the_summary_adds_up_with_max_samples(tmp_path):
    data = tmp_path / "mixed.jsonl"
    recs = [json.loads(line) for line in (ASSETS / "data" / "sample_chat.jsonl").read_text().splitlines()[:10]]
    recs.append({"messages": [{"role": "user", "content": "no answer"}]})  # no assistant turn
    data.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{not json\n")
    cfg = load_config(data={"dataset": {"path": [str(data)], "max_samples": 4, "cache_dir": str(tmp_path / "c")}})
    tok = load_tokenizer(str(ASSETS / "tiny-target"))
    for _ in range(2):  # tokenized, then from the cache: the same line
        samples, stats = build_samples(cfg.dataset, tok)
        n = _numbers(stats.summary())
        assert len(samples) == n["samples"] == n["first"] == 4 and n["of"] == 10
        assert n["records"] == 12 == n["of"] + n["no_assistant"] + n["malformed"] + n["no_loss"]


def test_vocab_tokenizes_with_a_progress_bar(tmp_path, monkeypatch):
    shown = []
    real = build_mod._progress

    def spy(enabled: bool):
        shown.append(enabled)
        return real(enabled)

    monkeypatch.setattr(build_mod, "_progress", spy)
    cfg = load_config(data={"model": {"target": str(ASSETS / "tiny-target"), "draft_vocab_size": 64},
                            "dataset": {"path": [str(ASSETS / "data" / "sample_chat.jsonl")], "cache_dir": ""},
                            "run": {"output_dir": str(tmp_path / "out")}, "logging": {"progress": True}})
    assert build_vocab_for_config(cfg).is_file()
    assert shown == [True]


def test_one_bincount_equals_per_sample_counting():
    from specforge_core.types import Sample

    g = torch.Generator().manual_seed(0)
    samples = [Sample(str(i), torch.randint(0, 50, (n,), generator=g), (torch.rand(n, generator=g) > 0.4).to(torch.uint8))
               for i, n in enumerate([1, 7, 30, 0, 12])]
    slow = torch.zeros(50, dtype=torch.int64)
    for s in samples:
        for t, m in zip(s.input_ids.tolist(), s.loss_mask.tolist(), strict=True):
            slow[t] += m
    assert torch.equal(count_loss_tokens(samples, 50), slow)
