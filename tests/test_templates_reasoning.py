"""Reasoning content: the three input forms, keep/drop, and loss masks pinned token by token.

The reference for the mask is computed another way: render the conversation up to the reply with
the generation prompt (what the target is given), and the reply is whatever the full render adds
after it (what the target generates), minus the newline ChatML writes after <|im_end|>.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from specforge_core.data import DataError, load_tokenizer, tokenize_conversation
from specforge_core.data.formats import load_conversations, parse_record

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT.parent / "configs" / "assets" / "tiny-target"
QWEN3_JINJA = (ROOT / "data" / "qwen3_chat_template.jinja").read_text()

SYSTEM = {"role": "system", "content": "You are terse."}
Q1, A1, R1 = "What is 2 plus 3?", "It is 5.", "2 and 3 make 5."
Q2, A2, R2 = "Spell cat.", "c-a-t.", "Letters: c, a, t."


def record(form: str) -> dict:
    """One two-turn conversation with reasoning on both assistant turns, in one input form."""
    def asst(answer: str, reasoning: str) -> dict:
        if form == "reasoning_content":
            return {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        if form == "thinking":
            return {"role": "assistant", "content": answer, "thinking": reasoning}
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}
    return {"messages": [SYSTEM, {"role": "user", "content": Q1}, asst(A1, R1),
                         {"role": "user", "content": Q2}, asst(A2, R2)]}


FORMS = ("reasoning_content", "thinking", "inline")
HEAD = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    f"<|im_start|>user\n{Q1}<|im_end|>\n"
    f"<|im_start|>assistant\n{A1}<|im_end|>\n"  # Qwen3 drops reasoning before the last user turn
    f"<|im_start|>user\n{Q2}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Hand-written: what Qwen3's template renders (character for character) and what is in the loss.
QWEN3_TEXT = {
    "keep": (HEAD + f"<think>\n{R2}\n</think>\n\n{A2}<|im_end|>\n",
             [f"{A1}<|im_end|>", f"<think>\n{R2}\n</think>\n\n{A2}<|im_end|>"]),
    # enable_thinking=False: the empty think block is the generation prompt's, not the target's
    "drop": (HEAD + f"<think>\n\n</think>\n\n{A2}<|im_end|>\n", [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]),
}


def load(tmp_path, rec: dict, reasoning: str):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    convs, _ = load_conversations([f], on_error="stop", reasoning=reasoning)
    return convs[0]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ASSETS))


@pytest.fixture(scope="module")
def qwen3_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = QWEN3_JINJA
    return t


def masked_texts(tok, ids, mask) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("form", FORMS)
def test_three_forms_normalise_to_one_field(form):
    conv = parse_record(record(form))
    assert [(t.content, t.reasoning) for t in conv.turns if t.role == "assistant"] == [(A1, R1), (A2, R2)]


def test_sharegpt_records_carry_reasoning_too():
    rec = {"conversations": [{"from": "human", "value": Q1},
                             {"from": "gpt", "value": A1, "reasoning_content": R1},
                             {"from": "human", "value": Q2},
                             {"from": "gpt", "value": f"<think>{R2}</think>{A2}"}]}
    conv = parse_record(rec)
    assert [(t.content, t.reasoning) for t in conv.turns if t.role == "assistant"] == [(A1, R1), (A2, R2)]
    assert [t.reasoning for t in conv.turns if t.role == "user"] == [None, None]


def test_reasoning_given_twice_is_refused_with_file_and_line(tmp_path):
    rec = record("inline")
    rec["messages"][2]["thinking"] = "x"
    f = tmp_path / "d.jsonl"
    f.write_text("\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: turn 2: reasoning given twice"):
        load_conversations([f], on_error="stop")


@pytest.mark.parametrize("reasoning", ["keep", "drop"])
@pytest.mark.parametrize("form", FORMS)
def test_qwen3_named_equals_real_template_token_by_token(tmp_path, tok, qwen3_tok, form, reasoning):
    conv = load(tmp_path, record(form), reasoning)
    text, loss_texts = QWEN3_TEXT[reasoning]
    named = tokenize_conversation(tok, conv, "qwen3", 4096)
    auto = tokenize_conversation(qwen3_tok, conv, "auto", 4096)
    assert named == auto  # ids and mask, token by token
    ids, mask, _ = named
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert masked_texts(tok, ids, mask) == loss_texts


@pytest.mark.parametrize("reasoning", ["keep", "drop"])
def test_mask_is_what_the_target_generates(tmp_path, tok, qwen3_tok, reasoning):
    """Reference per assistant turn: the prompt-only render with the generation prompt is a prefix
    of the full render; what follows it up to <|im_end|> is what the target generates."""
    conv = load(tmp_path, record("reasoning_content"), reasoning)
    msgs = conv.messages()
    extra = {"enable_thinking": False} if reasoning == "drop" else {}
    full = qwen3_tok.apply_chat_template(msgs, tokenize=False, **extra)
    ids, mask, _ = tokenize_conversation(qwen3_tok, conv, "auto", 4096)
    expected = [0] * len(ids)
    for i in (2, 4):  # the assistant turns
        prompt = qwen3_tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True, **extra)
        if not full.startswith(prompt):
            # non-thinking mode, an earlier turn: its prompt pre-filled an empty think block that
            # Qwen3's history view (the training text) omits; the reply is the answer after the header
            assert reasoning == "drop" and i == 2
            prompt = qwen3_tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt)
        reply = full[len(prompt):full.index("<|im_end|>", len(prompt)) + len("<|im_end|>")]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(reply, add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids) + len(r_ids)] == p_ids + r_ids  # token boundaries agree
        expected[len(p_ids): len(p_ids) + len(r_ids)] = [1] * len(r_ids)
    assert mask == expected  # not one token off at either boundary (SpecForge #885)
    assert R1 not in full  # Qwen3 drops reasoning of turns before the last user message
    assert (R2 in full) == (reasoning == "keep")


def test_single_turn_keep_and_records_without_reasoning(tmp_path, tok, qwen3_tok):
    rec = {"messages": [{"role": "user", "content": Q1},
                        {"role": "assistant", "content": A1, "thinking": R1}]}
    conv = load(tmp_path, rec, "keep")
    ids, mask, _ = tokenize_conversation(tok, conv, "qwen3", 4096)
    assert masked_texts(tok, ids, mask) == [f"<think>\n{R1}\n</think>\n\n{A1}<|im_end|>"]
    assert (ids, mask, False) == tokenize_conversation(qwen3_tok, conv, "auto", 4096)
    # no reasoning in the record: Qwen3 renders an empty think block, generated in thinking mode
    rec["messages"][1].pop("thinking")
    conv = load(tmp_path, rec, "keep")
    ids, mask, _ = tokenize_conversation(tok, conv, "qwen3", 4096)
    assert masked_texts(tok, ids, mask) == [f"<think>\n\n</think>\n\n{A1}<|im_end|>"]
    assert (ids, mask, False) == tokenize_conversation(qwen3_tok, conv, "auto", 4096)


def test_chatml_drop_equals_the_record_without_reasoning(tmp_path, tok):
    plain = {"messages": [SYSTEM, {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                          {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}
    for form in FORMS:
        got = tokenize_conversation(tok, load(tmp_path, record(form), "drop"), "chatml", 4096)
        assert got == tokenize_conversation(tok, load(tmp_path, plain, "keep"), "chatml", 4096)
        assert masked_texts(tok, got[0], got[1]) == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]


def test_template_that_cannot_render_reasoning_is_an_error(tmp_path, tok):
    conv = load(tmp_path, record("thinking"), "keep")
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*chatml.*cannot render"):
        tokenize_conversation(tok, conv, "chatml", 4096)
    # a tokenizer template that silently ignores reasoning_content (plain ChatML jinja)
    chatml_tok = copy.deepcopy(tok)
    chatml_tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"d\.jsonl:1: assistant turn 2 .*does not render reasoning_content"):
        tokenize_conversation(chatml_tok, conv, "auto", 4096)


def test_dataset_section_reasoning_reaches_samples_cache_and_prompts(tmp_path, tok):
    from specforge_core.config.schema import DatasetSection
    from specforge_core.data.build import build_samples, load_prompts

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(record("inline")) + "\n")
    built = {}
    for mode in ("keep", "drop"):
        cfg = DatasetSection(path=[str(f)], chat_template="qwen3", reasoning=mode, cache_dir=str(tmp_path / "c"))
        (sample,), _ = build_samples(cfg, tok)
        built[mode] = sample
        assert tok.decode(sample.input_ids.tolist()) == QWEN3_TEXT[mode][0]
        assert masked_texts(tok, sample.input_ids.tolist(), sample.loss_mask.tolist()) == QWEN3_TEXT[mode][1]
    assert len(list((tmp_path / "c").iterdir())) == 2  # the mode is part of the cache key
    # eval prompt in non-thinking mode: the last reply dropped, empty think block pre-filled
    (p,) = load_prompts([f], tok, "qwen3", reasoning="drop")
    assert tok.decode(p.input_ids.tolist()) == HEAD + "<think>\n\n</think>\n\n"
    assert p.reference_text == A2


def test_eval_and_regenerate_render_prompts_with_dataset_reasoning(tmp_path, tok):
    """`specforge eval` (resolve_prompts, from [dataset] reasoning) and `data regenerate` build their
    prompts in the dataset's reasoning mode: "drop" pre-fills Qwen3's empty think block, "keep" does not."""
    from specforge_core.config import load_config
    from specforge_core.data.regenerate import regenerate
    from specforge_core.evaluation.evaluate import resolve_prompts

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(record("inline")) + "\n")
    got = {m: tok.decode(resolve_prompts([f], str(ASSETS), tok, "qwen3", reasoning=m)[0].input_ids.tolist())
           for m in ("keep", "drop")}
    assert got["drop"] == HEAD + "<think>\n\n</think>\n\n"
    assert got["keep"] == HEAD

    for mode in ("keep", "drop"):
        out = tmp_path / f"regen-{mode}.jsonl"
        cfg = load_config([ROOT.parent / "configs" / "quickstart.toml"], overrides=[
            f"run.output_dir={tmp_path / 'run'}", f"model.target={ASSETS}", f"dataset.path=['{f}']",
            "dataset.chat_template=qwen3", f"dataset.reasoning={mode}", f"regenerate.output={out}",
            "regenerate.max_new_tokens=2", "logging.progress=false"])
        regenerate(cfg)
        (rec,) = [json.loads(x) for x in out.read_text().splitlines()[1:]]  # after the header line
        assert rec["status"] in ("ok", "truncated"), rec
