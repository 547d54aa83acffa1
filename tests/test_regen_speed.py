"""benchmarks/regen_speed.py on CPU with a tiny random target: the static-cache path's greedy answers
equal the dynamic-cache path's and a one-token-at-a-time reference's, and the table counts them."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import regen_speed  # noqa: E402

from specforge_core.data.regenerate import loop_length  # noqa: E402

PROMPTS = ["hi", "what is two plus two?", "tell me a story about a cat and a dog", "ok", "why is the sky blue",
           "name three colours"]


def _greedy_by_hand(model, tok, text: str, new: int) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


def test_static_path_equals_dynamic_and_a_slow_reference(tiny_chat_target, tmp_path, capsys):
    model, tok = regen_speed.load(tiny_chat_target, "cpu", "float32")
    rows = regen_speed.compare(model, tok, PROMPTS, ["dynamic", "static"], batch_size=4, max_new_tokens=24,
                               loop_tokens=8, bucket=1)  # bucket 1: no extra padding, the slow reference's input
    dyn, st = rows
    assert dyn["answers"] == st["answers"] == len(PROMPTS)
    assert st["identical"] == len(PROMPTS) and st["tokens"] == dyn["tokens"] > 0
    # both paths against a greedy loop written here (no cache, no batch)
    answers = regen_speed.generate(model, tok, PROMPTS, "static", 4, 24, bucket=1)["answers"]
    for p, a in zip(PROMPTS, answers, strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        assert a == _greedy_by_hand(model, tok, text, 24), p
    assert st["degenerate"] == sum(loop_length(a)[1] >= 8 for a in answers)
    assert "| static | 6 |" in regen_speed.table(rows)


def test_cli_writes_rows(tiny_chat_target, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl.gz"
    with gzip.open(prompts, "wt", encoding="utf-8") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    out = tmp_path / "rows.json"
    assert regen_speed.main(["--model", str(tiny_chat_target), "--prompts", str(prompts), "--n", "5",
                             "--batch-size", "2", "--max-new-tokens", "8", "--out", str(out),
                             "--paths", "dynamic", "static-eager"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["dynamic", "static-eager"] and rows[0]["answers"] == 5
    assert rows[1]["identical"] == 5  # fp32 on CPU: the same greedy answers
    assert "tok/s" in capsys.readouterr().out
