"""Reading conversation files: format detection, JSON lists, malformed records, no-assistant skips."""

from __future__ import annotations

import json

import pytest

from specforge_core.data import DataError, load_conversations, parse_record

SHAREGPT = {
    "id": "a1",
    "category": "math",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "1+1?"},
        {"from": "gpt", "value": "2."},
        {"from": "user", "value": "2+2?"},
        {"from": "assistant", "value": "4."},
    ],
}
OPENAI = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
    ]
}


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_sharegpt_and_openai_detected_per_record(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, "", OPENAI])
    convs, stats = load_conversations([f])
    assert stats.lines == 2 and stats.skipped_malformed == 0
    a, b = convs
    assert a.sample_id == "a1" and a.category == "math"
    assert [(t.role, t.content) for t in a.turns] == [
        ("system", "Be brief."), ("user", "1+1?"), ("assistant", "2."), ("user", "2+2?"), ("assistant", "4."),
    ]
    # no id: file stem + line number (line 3: the blank line counts as a line)
    assert b.sample_id == "d:3" and b.category is None and b.source.endswith("d.jsonl:3")
    assert [(t.role, t.content) for t in b.turns] == [("user", "Hi"), ("assistant", "Hello")]


def test_json_list_file_with_line_numbers(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("[\n" + json.dumps(OPENAI) + ",\n  " + json.dumps(SHAREGPT) + ",\n 5\n]\n")
    convs, stats = load_conversations([f])
    assert [c.sample_id for c in convs] == ["d:2", "a1"]
    assert stats.skipped_malformed == 1
    assert stats.errors[0].startswith(f"{f}:4: expected a JSON object")


def test_forced_format_rejects_the_other_style(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    with pytest.raises(DataError, match=r"d\.jsonl:1: 'messages' must be a list"):
        load_conversations([f], fmt="openai", on_error="stop")
    assert len(load_conversations([f], fmt="sharegpt")[0]) == 1


BAD_LINES = [
    ("{not json", "invalid JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), "content must be a string, got int"),
    (json.dumps({"conversations": "hello"}), "'conversations' must be a list"),
    (json.dumps({"text": "hello"}), "neither 'conversations'"),
    (json.dumps({"messages": [], "category": 3}), "'category' must be a string"),
]


@pytest.mark.parametrize("line,why", BAD_LINES)
def test_malformed_line_stop_names_file_and_line(tmp_path, line, why):
    f = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, line, OPENAI])
    with pytest.raises(DataError) as e:
        load_conversations([f], on_error="stop")
    assert str(e.value).startswith(f"{f}:2: ") and why in str(e.value)


def test_malformed_lines_skipped_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT] + [b for b, _ in BAD_LINES] + [OPENAI])
    convs, stats = load_conversations([f], on_error="skip")
    assert len(convs) == 2
    assert stats.skipped_malformed == len(BAD_LINES)
    assert [e.split(": ")[0] for e in stats.errors] == [f"{f}:{i}" for i in range(2, 2 + len(BAD_LINES))]


def test_no_assistant_turn_skipped_and_counted(tmp_path):
    only_user = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [only_user, OPENAI, {"conversations": []}])
    convs, stats = load_conversations([f])
    assert len(convs) == 1 and stats.skipped_no_assistant == 2 and stats.skipped_malformed == 0
    # prompts keep them
    assert len(load_conversations([f], require_assistant=False)[0]) == 3


def test_parse_record_rejects_non_object():
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_record([1, 2])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_conversations([tmp_path / "nope.jsonl"])


def test_unicode_line_separators_inside_strings_do_not_split_records(tmp_path):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines() but ordinary characters in a
    JSON string: records holding them stay whole and later line numbers stay right."""
    recs = [{"conversations": [{"from": "human", "value": f"a{ch}b"}, {"from": "gpt", "value": f"c{ch}d"}]}
            for ch in ("\u2028", "\u2029", "\u0085")]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n{not json\n", encoding="utf-8")
    convs, stats = load_conversations([f], on_error="skip")
    assert [c.turns[1].content for c in convs] == ["c\u2028d", "c\u2029d", "c\u0085d"]
    assert stats.skipped_malformed == 1 and stats.errors[0].startswith(f"{f}:4: ")


def test_a_non_utf8_byte_costs_one_record_with_its_line(tmp_path):
    f = tmp_path / "d.jsonl"
    good = json.dumps(SHAREGPT).encode()
    f.write_bytes(good + b"\n" + b'{"conversations": [{"from": "human", "value": "\xff"}]}' + b"\n" + good + b"\n")
    convs, stats = load_conversations([f], on_error="skip")
    assert len(convs) == 2 and stats.skipped_malformed == 1
    assert stats.errors[0].startswith(f"{f}:2: not UTF-8")
    with pytest.raises(DataError, match=f"{f}:2: not UTF-8"):
        load_conversations([f], on_error="stop")


@pytest.mark.parametrize("role", ["chatgpt", "bing", "bard"])
def test_sharegpt_product_roles_are_the_assistant(role):
    conv = parse_record({"conversations": [{"from": "human", "value": "q"}, {"from": role, "value": "a"}]})
    assert [t.role for t in conv.turns] == ["user", "assistant"]


@pytest.mark.parametrize("template", ["auto", "chatml", "llama3"])
def test_batched_tokenization_equals_one_conversation_at_a_time(tmp_path, template):
    """tokenize_batch (one tokenizer call per chunk) gives every conversation exactly the ids,
    mask and truncation flag of tokenize_conversation; records hold U+2028/U+0085 and real roles."""
    from pathlib import Path

    from specforge_core.data import load_tokenizer, tokenize_conversation
    from specforge_core.data.tokenize import tokenize_batch

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "configs" / "assets" / "tiny-target")
    records = []
    for i in range(40):
        turns = [{"from": "system", "value": "Be brief."}] if i % 3 == 0 else []
        for j in range(1 + i % 4):
            turns.append({"from": "human", "value": f"q{i}.{j} line\u2028sep\u0085next " + "word " * (i % 7)})
            turns.append({"from": ("gpt", "chatgpt", "bing", "bard")[j % 4], "value": f"answer {i} {j} " * (1 + i % 5)})
        records.append({"id": f"r{i}", "conversations": turns})
    convs, _ = load_conversations([write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in records])])
    assert len(convs) == 40
    one_by_one = [tokenize_conversation(tok, c, template, 48) for c in convs]
    assert tokenize_batch(tok, convs, template, 48) == one_by_one
    assert any(t for _, _, t in one_by_one) and not all(t for _, _, t in one_by_one)  # both kinds
    assert tokenize_batch(tok, [], template, 48) == []


def test_tokenize_all_in_worker_processes_equals_one_process(tmp_path, monkeypatch):
    """The process pool (used from PARALLEL_MIN conversations on) returns the same samples, in the
    same order, with the same stats as tokenizing in this process."""
    from pathlib import Path

    import torch

    from specforge_core.config.schema import DatasetSection
    from specforge_core.data import build as build_mod
    from specforge_core.data import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "configs" / "assets" / "tiny-target")
    lines = [json.dumps({"id": f"r{i}", "conversations": [
        {"from": "human", "value": f"question {i} " * (1 + i % 9)},
        {"from": "gpt" if i % 5 else "bing", "value": f"reply {i} " * (1 + i % 13)}]}) for i in range(60)]
    lines[7] = "{broken"
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    cfg = DatasetSection(path=[str(path)], max_seq_length=40)
    monkeypatch.setenv("SPECFORGE_TOKENIZE_WORKERS", "1")
    serial, st1 = build_mod.tokenize_all(cfg, tok, [path])
    monkeypatch.setattr(build_mod, "PARALLEL_MIN", 0)
    monkeypatch.setattr(build_mod, "TOKENIZE_CHUNK", 8)
    monkeypatch.setenv("SPECFORGE_TOKENIZE_WORKERS", "2")
    with build_mod._pool(tok, len(lines)) as pool:
        assert pool is not None  # the pool path is the one under test
    parallel, st2 = build_mod.tokenize_all(cfg, tok, [path], progress=True)
    assert [s.sample_id for s in parallel] == [s.sample_id for s in serial] and len(serial) > 30
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
               for a, b in zip(parallel, serial, strict=True))
    assert (st2.truncated, st2.skipped_malformed, st2.samples) == (st1.truncated, st1.skipped_malformed, st1.samples)
    assert st1.truncated > 0 and st1.skipped_malformed == 1
