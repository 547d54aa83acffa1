"""`specforge data regenerate` (issue 16): the target answers every user turn itself, turn by turn,
and a killed run resumes without losing or duplicating a record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specforge_core.config import load_config
from specforge_core.data import load_tokenizer
from specforge_core.data.formats import Conversation, Turn, load_conversations
from specforge_core.data.regenerate import read_done, regenerate
from specforge_core.data.tokenize import encode_prompt

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "configs" / "assets" / "tiny-target"


def _config(tmp_path, out, n=6, batch=4, new_tokens=12, extra=()):
    return load_config([ROOT / "configs" / "quickstart.toml"], overrides=[
        f"run.output_dir={tmp_path / 'run'}", f"model.target={TARGET}",
        f"dataset.path=['{ROOT / 'configs' / 'assets' / 'data' / 'sample_chat.jsonl'}']",
        f"regenerate.output={out}", f"regenerate.batch_size={batch}", f"regenerate.max_new_tokens={new_tokens}",
        "logging.progress=false", f"dataset.max_samples={n}", *extra,
    ])


def _slow_reference(conv: Conversation, model, tok, template: str, new_tokens: int) -> list[Turn]:
    """Greedy by hand, one token at a time, the whole sequence recomputed every step (no cache, no
    batching), turn by turn on the target's own earlier replies."""
    eos = {tok.eos_token_id}
    history: list[Turn] = []
    for t in conv.turns:
        if t.role != "assistant":
            history.append(t)
            continue
        ids = encode_prompt(tok, Conversation(conv.sample_id, list(history)), template)
        out: list[int] = []
        for _ in range(new_tokens):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
        history.append(Turn("assistant", tok.decode(out, skip_special_tokens=True)))
    return history


# the static KV cache batches prompts by length and pads them to a bucket: same answers, in order
@pytest.mark.parametrize("cache", [[], ["inference.hf.generate_cache=static", "inference.hf.generate_bucket=16"]],
                         ids=["dynamic", "static"])
def test_greedy_regeneration_equals_a_slow_turn_by_turn_reference(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "regen.jsonl"
    cfg = _config(tmp_path, out, n=5, batch=3, extra=cache)
    summary = regenerate(cfg)
    head, *lines = out.read_text().splitlines()
    assert json.loads(head)["specforge_regenerate_header"]["max_samples"] == 5
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(range(len(records))) and summary["records"] == len(records)
    model = AutoModelForCausalLM.from_pretrained(TARGET).eval()
    tok = load_tokenizer(str(TARGET))
    convs, _ = load_conversations(cfg.dataset.path, require_assistant=False)
    for rec in records[:5]:
        ref = _slow_reference(convs[rec["index"]], model, tok, cfg.dataset.chat_template, 12)
        got = [(c["from"], c["value"]) for c in rec["conversations"]]
        want = [({"user": "human", "assistant": "gpt"}.get(t.role, t.role), t.content) for t in ref]
        assert got == want, rec["index"]
        assert rec["status"] in ("ok", "truncated")
    # the output is training data: the loader reads it
    again, stats = load_conversations([out])
    assert len(again) == sum(r["status"] in ("ok", "truncated") for r in records)


@pytest.mark.slow
def test_killed_regeneration_resumes_without_loss_or_duplicates(tmp_path):
    """A real process SIGKILLed mid-run, then rerun: the same records as an uninterrupted run."""
    whole = tmp_path / "whole.jsonl"
    regenerate(_config(tmp_path, whole, n=24, batch=2, new_tokens=24))
    out = tmp_path / "killed.jsonl"
    script = (f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'plugins')]!r}\n"
              "from specforge_core.cli import main\n"
              f"main(['data', 'regenerate', {str(ROOT / 'configs' / 'quickstart.toml')!r}, "
              f"'run.output_dir={tmp_path / 'run'}', 'model.target={TARGET}', 'regenerate.output={out}', "
              f"'regenerate.batch_size=2', 'regenerate.max_new_tokens=24', 'logging.progress=false', "
              f"'dataset.max_samples=24', "
              f"\"dataset.path=['{ROOT / 'configs' / 'assets' / 'data' / 'sample_chat.jsonl'}']\"])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_done(out)
    assert 4 <= len(partial) < 24, len(partial)
    with open(out, "ab") as f:  # a torn write the crash could also have left
        f.write(b'{"index": 999, "id": "torn')
    regenerate(_config(tmp_path, out, n=24, batch=2, new_tokens=24))
    lines = out.read_text().splitlines()[1:]  # after the header
    indices = [json.loads(line)["index"] for line in lines]
    assert sorted(indices) == list(range(24)) and len(set(indices)) == 24
    assert {json.loads(line)["index"]: json.loads(line) for line in lines} == read_done(whole)
    assert out.read_bytes() == whole.read_bytes()  # header and records: byte-identical
