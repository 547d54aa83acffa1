"""build_samples (stats, cache), load_prompts, and the shipped sample data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_core.config.schema import DatasetSection
from specforge_core.data import DataError, build_samples, load_prompts, load_tokenizer
from specforge_core.data import build as build_mod

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ASSETS / "tiny-target"))


def conv(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


@pytest.fixture
def data_file(tmp_path):
    lines = [
        json.dumps(conv("What is 1 plus 1?", "1 plus 1 is 2.", id="s0", category="math")),
        "{broken",
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps(conv("Count from 1 to 40.", ", ".join(str(i) for i in range(1, 41)) + ".", id="long")),
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_build_samples_stats_and_types(tok, data_file, tmp_path):
    cfg = DatasetSection(path=[str(data_file)], chat_template="llama3", max_seq_length=48,
                         cache_dir=str(tmp_path / "cache"))
    samples, stats = build_samples(cfg, tok)
    assert [s.sample_id for s in samples] == ["s0", "long"]
    assert samples[0].category == "math" and samples[1].category is None
    assert (stats.lines, stats.samples, stats.skipped_malformed, stats.skipped_no_assistant, stats.truncated) == (
        4, 2, 1, 1, 1,
    )
    assert stats.errors == [f"{data_file}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]
    for s in samples:
        assert s.input_ids.dtype == torch.int64 and s.loss_mask.dtype == torch.uint8
        assert s.input_ids.shape == s.loss_mask.shape and s.num_tokens <= 48
    assert samples[1].num_tokens == 48
    assert tok.decode(samples[0].input_ids[samples[0].loss_mask.bool()]) == "1 plus 1 is 2.<|eot_id|>"


def test_on_error_stop(tok, data_file, tmp_path):
    cfg = DatasetSection(path=[str(data_file)], on_error="stop", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        build_samples(cfg, tok)


def test_second_call_hits_the_cache(tok, data_file, tmp_path, monkeypatch):
    cfg = DatasetSection(path=[str(data_file)], chat_template="auto", cache_dir=str(tmp_path / "cache"))
    first, stats1 = build_samples(cfg, tok)
    assert not stats1.from_cache and len(list((tmp_path / "cache").iterdir())) == 1

    calls = []
    real = build_mod.tok.tokenize_batch  # counts conversations tokenized
    monkeypatch.setattr(build_mod.tok, "tokenize_batch", lambda *a, **k: calls.extend([1] * len(a[1])) or real(*a, **k))
    second, stats2 = build_samples(cfg, tok)
    assert calls == [] and stats2.from_cache
    assert [s.sample_id for s in second] == [s.sample_id for s in first]
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
               for a, b in zip(first, second, strict=True))
    assert (stats2.skipped_malformed, stats2.truncated, stats2.errors) == (
        stats1.skipped_malformed, stats1.truncated, stats1.errors)

    # a setting that changes tokenization misses the cache; so does a changed file
    build_samples(DatasetSection(path=[str(data_file)], chat_template="chatml", cache_dir=cfg.cache_dir), tok)
    assert len(calls) == 2
    data_file.write_text(data_file.read_text() + json.dumps(conv("Hi", "Hello.")) + "\n")
    third, _ = build_samples(cfg, tok)
    assert len(calls) == 5 and len(third) == 3
    # max_samples is applied after the cache
    capped, st = build_samples(DatasetSection(path=[str(data_file)], cache_dir=cfg.cache_dir, max_samples=1), tok)
    assert len(capped) == 1 and st.samples == 1 and len(calls) == 5
    # use_cache=False always tokenizes
    build_samples(cfg, tok, use_cache=False)
    assert len(calls) == 8


def test_empty_path_and_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match="dataset.path is empty"):
        build_samples(DatasetSection(), tok)
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        build_samples(DatasetSection(), tok, paths=[tmp_path / "nope.jsonl"])


def test_load_prompts(tok, tmp_path):
    f = tmp_path / "p.jsonl"
    recs = [
        {"id": "p0", "category": "math", "conversations": [
            {"from": "system", "value": "Be terse."}, {"from": "human", "value": "1+1?"},
            {"from": "gpt", "value": "2."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4."}]},
        {"id": "p1", "messages": [{"role": "user", "content": "Hi"}]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    p0, p1 = load_prompts([f], tok, "auto", 2048)
    assert (p0.sample_id, p0.category, p0.reference_text) == ("p0", "math", "4.")
    assert (p1.sample_id, p1.category, p1.reference_text) == ("p1", None, None)
    hdr = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert tok.decode(p0.input_ids) == (
        "<|begin_of_text|>" + hdr.format("system") + "Be terse.<|eot_id|>" + hdr.format("user") + "1+1?<|eot_id|>"
        + hdr.format("assistant") + "2.<|eot_id|>" + hdr.format("user") + "2+2?<|eot_id|>" + hdr.format("assistant")
    )
    assert p0.input_ids.dtype == torch.int64
    short = load_prompts([f], tok, "llama3", 5)
    assert torch.equal(short[0].input_ids, p0.input_ids[-5:])


def test_shipped_data_loads_cleanly(tok, tmp_path):
    cfg = DatasetSection(path=[str(ASSETS / "data" / "sample_chat.jsonl")], cache_dir=str(tmp_path / "c"))
    samples, stats = build_samples(cfg, tok, use_cache=False)
    assert stats.samples == stats.lines >= 200 and stats.skipped_malformed == 0 and stats.truncated == 0
    assert {s.category for s in samples} >= {"arithmetic", "counting", "spelling", "facts", "multi-turn"}
    prompts = load_prompts([ASSETS / "data" / "eval_prompts.jsonl"], tok, "auto", 2048)
    assert len(prompts) >= 30 and all(p.reference_text and p.category for p in prompts)
