"""`specforge data regenerate` resumes only its own file: the output carries a header (input
sha256, settings); a rerun with another input or setting is refused naming what differs, or starts
a new file when asked; a moved input still resumes; records opening with an assistant turn keep
their later turns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_data_regenerate import _slow_reference

from specforge_core import cli
from specforge_core.config import load_config
from specforge_core.data import load_tokenizer
from specforge_core.data.formats import DataError, load_conversations
from specforge_core.data.regenerate import read_done, read_header, regenerate

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "configs" / "assets" / "tiny-target"
SAMPLE = ROOT / "configs" / "assets" / "data" / "sample_chat.jsonl"


def _args(tmp_path: Path, out: Path, data: Path = SAMPLE, n: int = 3, new_tokens: int = 6) -> list[str]:
    return [f"run.output_dir={tmp_path / 'run'}", f"model.target={TARGET}", f"dataset.path=['{data}']",
            f"regenerate.output={out}", "regenerate.batch_size=2", f"regenerate.max_new_tokens={new_tokens}",
            "logging.progress=false", f"dataset.max_samples={n}"]


def _config(tmp_path: Path, out: Path, **kw):
    return load_config([ROOT / "configs" / "quickstart.toml"], overrides=_args(tmp_path, out, **kw))


def _other_data(tmp_path: Path) -> Path:
    f = tmp_path / "other.jsonl"
    f.write_text("".join(json.dumps({"id": f"o{i}", "conversations": [
        {"from": "human", "value": f"Name the number {i}."}, {"from": "gpt", "value": "Sure."}]}) + "\n"
        for i in range(3)))
    return f


def test_rerun_with_another_input_or_setting_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "regen.jsonl"
    regenerate(_config(tmp_path, out))
    before = out.read_bytes()
    head = read_header(out)
    assert head["input_sha256"] and head["max_new_tokens"] == 6
    with pytest.raises(DataError, match=r"other inputs or settings: input files' content"):
        regenerate(_config(tmp_path, out, data=_other_data(tmp_path)))
    with pytest.raises(DataError, match=r"max_new_tokens: file 6, config 8"):
        regenerate(_config(tmp_path, out, new_tokens=8))
    with pytest.raises(DataError, match=r"max_samples: file 3, config 2"):
        regenerate(_config(tmp_path, out, n=2))
    assert out.read_bytes() == before  # nothing was mixed in


def test_restart_moves_the_old_file_aside_and_writes_only_new_records(tmp_path):
    out = tmp_path / "regen.jsonl"
    regenerate(_config(tmp_path, out))
    old = out.read_bytes()
    other = _other_data(tmp_path)
    summary = regenerate(_config(tmp_path, out, data=other), restart=True)
    assert summary["records"] == 3 and summary["ok"] + summary.get("truncated", 0) == 3
    assert sorted(r["id"] for r in read_done(out).values()) == ["o0", "o1", "o2"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("regen.jsonl.replaced-")]
    assert len(aside) == 1 and aside[0].read_bytes() == old


def test_a_file_without_header_is_refused_through_the_cli(tmp_path, capsys):
    out = tmp_path / "regen.jsonl"
    # an older run's output: 400 records, no header; the input has 48
    out.write_text("".join(json.dumps({"index": i, "id": str(i), "status": "ok", "conversations": []}) + "\n"
                           for i in range(400)))
    code = cli.main(["data", "regenerate", str(ROOT / "configs" / "quickstart.toml"), *_args(tmp_path, out, n=48)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "has no regenerate header" in lines[0] and "--restart" in lines[0], err
    code = cli.main(["data", "regenerate", "--restart", str(ROOT / "configs" / "quickstart.toml"),
                     *_args(tmp_path, out, n=2)])
    assert code == 0 and sorted(read_done(out)) == [0, 1] and read_header(out)["max_samples"] == 2
    assert len(list(tmp_path.glob("regen.jsonl.replaced-*"))) == 1


def test_a_moved_input_resumes_and_says_so(tmp_path, caplog):
    out = tmp_path / "regen.jsonl"
    whole = tmp_path / "whole.jsonl"
    regenerate(_config(tmp_path, whole, n=4))
    regenerate(_config(tmp_path, out, n=4), stop_after_batches=1)  # 2 of 4 records
    moved = tmp_path / "moved" / "chat.jsonl"
    moved.parent.mkdir()
    shutil.copy(SAMPLE, moved)
    with caplog.at_level("INFO", logger="specforge_core.data.regenerate"):
        regenerate(_config(tmp_path, out, data=moved, n=4))
    assert "resuming" in caplog.text and "2 of 4 records already there, 2 to go" in caplog.text
    def strip(recs: dict) -> dict:  # "source" names the file each record was read from
        return {i: {k: v for k, v in r.items() if k != "source"} for i, r in recs.items()}

    assert strip(read_done(out)) == strip(read_done(whole))


def test_a_record_opening_with_an_assistant_turn_keeps_its_later_turns(tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "greeting.jsonl"
    data.write_text(json.dumps({"id": "g", "conversations": [
        {"from": "gpt", "value": "Hello! How can I help?"}, {"from": "human", "value": "What does the trubble eat?"},
        {"from": "gpt", "value": "Leaves."}, {"from": "human", "value": "Where does the skavvy live?"},
        {"from": "gpt", "value": "In the sewers."}]}) + "\n")
    out = tmp_path / "regen.jsonl"
    cfg = _config(tmp_path, out, data=data, n=1, new_tokens=8)
    regenerate(cfg)
    rec = read_done(out)[0]
    assert rec["status"] in ("ok", "truncated"), rec
    conv = load_conversations([data])[0][0]
    conv.turns = conv.turns[1:]  # the greeting before any user turn is dropped, the rest regenerated
    model = AutoModelForCausalLM.from_pretrained(TARGET, torch_dtype=torch.float32).eval()
    ref = _slow_reference(conv, model, load_tokenizer(str(TARGET)), cfg.dataset.chat_template, 8)
    want = [({"user": "human", "assistant": "gpt"}[t.role], t.content) for t in ref]
    assert [(c["from"], c["value"]) for c in rec["conversations"]] == want
    assert len(want) == 4
