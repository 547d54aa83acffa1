"""The reference assets (specforge_core/reference.py) and the real SmolLM2 target.

Fast tests check the conversions on small inputs built here. Tests marked slow load the real
SmolLM2-135M-Instruct and real ShareGPT written by `specforge reference fetch` (default ./reference,
or $SPECFORGE_REFERENCE_DIR); they are skipped, saying so, when those assets are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specforge_core.data.formats import load_conversations
from specforge_core.reference import (
    Paths,
    convert_sharegpt,
    iter_complete_records,
    jsonl_line,
    mtbench_turn1,
    mtbench_turn2,
    sharegpt_to_messages,
)

ROOT = Path(__file__).resolve().parents[1]


def _sharegpt(i: int, *turns: tuple[str, str]) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_truncated_sharegpt_keeps_complete_records_and_drops_the_cut_one(tmp_path):
    recs = [
        _sharegpt(0, ("human", "hi"), ("gpt", "hello\u2028there")),
        _sharegpt(1, ("human", "only a question")),  # no assistant turn: dropped
        _sharegpt(2, ("human", "q"), ("bard", "unknown speaker")),  # dropped
        _sharegpt(3, ("system", "be brief"), ("human", "q"), ("chatgpt", "a")),
        _sharegpt(4, ("human", "cut"), ("gpt", "this record is cut in the middle")),
    ]
    text = "[" + ", ".join(json.dumps(r, ensure_ascii=False) for r in recs) + "]"
    cut = text[: text.index("cut in the middle")]  # a truncated file, as in the wheel
    assert [r["id"] for r in iter_complete_records(cut)] == ["c0", "c1", "c2", "c3"]
    src = tmp_path / "sg.json"
    src.write_text(cut, encoding="utf-8")
    out = tmp_path / "sg.jsonl"
    st = convert_sharegpt(src, out)
    assert (st.complete, st.written, st.empty, st.bad_role) == (4, 2, 1, 1)
    assert st.truncated_bytes == len(cut) - cut.index('{"id": "c4"')
    # the project's reader takes every written line as one record, U+2028 inside content included
    convs, stats = load_conversations([out])
    assert stats.skipped_malformed == 0
    assert [c.sample_id for c in convs] == ["c0", "c3"]
    assert convs[0].turns[1].content == "hello\u2028there"
    assert [t.role for t in convs[1].turns] == ["system", "user", "assistant"]


def test_sharegpt_record_mapping():
    assert sharegpt_to_messages(_sharegpt(7, ("human", "q"), ("gpt", "a"))) == {
        "id": "c7", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert sharegpt_to_messages({"id": 1, "conversations": "not a list"}) is None
    with pytest.raises(KeyError):
        sharegpt_to_messages(_sharegpt(8, ("human", "q"), ("bing?", "a")))


def test_jsonl_line_is_one_line_for_splitlines():
    for s in ("a\u2028b", "a\u2029b", "a\x85b", "a\x0bb\x1cc", "plain ü 中文"):
        line = jsonl_line({"t": s})
        assert line.splitlines() == [line]
        assert json.loads(line) == {"t": s}
    assert "中文" in jsonl_line({"t": "中文"})  # non-ASCII stays readable (not \\u-escaped)


def test_mtbench_prompts_carry_category_and_turn2_follows_the_answer(tmp_path):
    qs = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
          {"question_id": 101, "category": "math", "turns": ["1+1?"]}]
    p1 = tmp_path / "t1.jsonl"
    p1.write_text("\n".join(mtbench_turn1(qs)) + "\n")
    convs, _ = load_conversations([p1], require_assistant=False)
    assert [(c.sample_id, c.category, c.turns[0].content) for c in convs] == [
        ("mtbench-81", "writing", "Write a poem."), ("mtbench-101", "math", "1+1?")]
    t2 = [json.loads(x) for x in mtbench_turn2(qs, ["A poem.", "2"])]
    assert len(t2) == 1  # only questions with a second turn
    assert [m["content"] for m in t2[0]["messages"]] == ["Write a poem.", "A poem.", "Now shorter."]
    assert t2[0]["category"] == "writing"


# ---------------------------------------------------------------------------- the real target

REF = Paths(Path(os.environ.get("SPECFORGE_REFERENCE_DIR") or ROOT / "reference"))
needs_assets = pytest.mark.skipif(
    not (REF.model / "model.safetensors").is_file() or not REF.sharegpt_small.is_file(),
    reason=f"reference assets absent in {REF.root} (run `specforge reference fetch`, ~120 MB download)",
)


@pytest.fixture(scope="module")
def real():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REF.model)
    model = AutoModelForCausalLM.from_pretrained(REF.model, dtype=torch.float32).eval()
    return tok, model


def _sample(tok, n: int = 0, max_len: int = 160):
    from specforge_core.data.formats import parse_record
    from specforge_core.data.tokenize import tokenize_conversation

    line = REF.sharegpt_small.read_text(encoding="utf-8").split("\n")[n]
    conv = parse_record(json.loads(line))
    ids, mask, _ = tokenize_conversation(tok, conv, "auto", max_len)
    return conv, ids, mask


@pytest.mark.slow
@needs_assets
def test_capture_equals_output_hidden_states_on_the_real_target(real):
    from specforge_hf_backend.backend import capture_hidden_states, find_decoder_layers
    from specforge_llama_eagle3.config import default_aux_layer_ids as default_aux_layers

    tok, model = real
    _, ids, _ = _sample(tok, 1)
    x = torch.tensor([ids])
    aux = default_aux_layers(model.config.num_hidden_layers)
    assert aux == [2, 15, 27]
    layers = find_decoder_layers(model.model, model.config.num_hidden_layers)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states
        with capture_hidden_states(layers, aux) as got:
            model.model(x)
    for i in aux:
        torch.testing.assert_close(got[i], ref[i], rtol=0, atol=0)
    # the reason a real target differs from the synthetic one: massive activations in the aux states
    assert ref[15].abs().max() > 100 * ref[15].pow(2).mean().sqrt()


@pytest.mark.slow
@needs_assets
def test_tied_head_rows_and_chatml_loss_mask_on_the_real_target(real):
    from specforge_core.target import load_target_head_and_embedding

    tok, model = real
    assert model.config.tie_word_embeddings
    rows = torch.tensor([2, 1, 49151, 17])
    embed, head = load_target_head_and_embedding(str(REF.model), rows, dtype=torch.float32)
    torch.testing.assert_close(head, model.lm_head.weight[rows].detach())
    torch.testing.assert_close(embed, model.model.embed_tokens.weight.detach())

    conv, ids, mask = _sample(tok, 0, max_len=4096)
    # the learned tokens are exactly the assistant replies, each closed by <|im_end|>
    spans, cur = [], None
    for t, m in zip(ids, mask, strict=True):
        if m and cur is None:
            cur = []
        if m:
            cur.append(t)
        elif cur is not None:
            spans.append(cur)
            cur = None
    replies = [t.content for t in conv.turns if t.role == "assistant"]
    assert [tok.decode(s) for s in spans] == [r + "<|im_end|>" for r in replies]
    assert tok.decode(ids[:3]).startswith("<|im_start|>system")  # SmolLM2's default system prompt


@pytest.mark.slow
@needs_assets
def test_a_few_training_steps_on_real_sharegpt(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "run", "configs/smollm2-sharegpt-cpu.toml",
         f"model.target={REF.model}", f'dataset.path=["{REF.sharegpt_small}"]', f"run.output_dir={out}",
         f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.max_samples=8", "dataset.max_seq_length=160",
         "training.micro_batch_size=4", "model.llama-eagle3.ttt_length=2", "model.draft_vocab_size=1024",
         "logging.progress=false", "training.log_every=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert 1 <= len(steps) <= 2, proc.stdout  # <= 8 samples (some have no reply within 160 tokens), 4 a step
    losses = [float(line.split("| loss ")[1].split()[0]) for line in steps]
    assert all(0 < v < 1e3 for v in losses)
    export = out / "export"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["hidden_size"] == 576 and (export / "model.safetensors").is_file()
