"""Loss masks pinned token by token for every chat template, on a hand-written conversation."""

from __future__ import annotations

from pathlib import Path

import pytest

from specforge_core.data import DataError, encode_prompt, load_tokenizer, tokenize_conversation
from specforge_core.data.formats import Conversation, Turn

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets" / "tiny-target"

CONV = Conversation(
    "c1",
    [
        Turn("system", "You are terse."),
        Turn("user", "What is 2 plus 3?"),
        Turn("assistant", "2 plus 3 is 5."),
        Turn("user", "Spell cat."),
        Turn("assistant", "cat is spelled c-a-t."),
    ],
)
ANSWERS = ["2 plus 3 is 5.", "cat is spelled c-a-t."]

# Hand-written renderings (what each template must produce, character for character).
LLAMA3_TEXT = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n2 plus 3 is 5.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nSpell cat.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\ncat is spelled c-a-t.<|eot_id|>"
)
CHATML_BODY = (
    "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
    "<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
    "<|im_start|>user\nSpell cat.<|im_end|>\n"
    "<|im_start|>assistant\ncat is spelled c-a-t.<|im_end|>\n"
)
CHATML_TEXT = "<|im_start|>system\nYou are terse.<|im_end|>\n" + CHATML_BODY
EXPECTED = {
    "auto": (LLAMA3_TEXT, "<|eot_id|>"),  # the tiny tokenizer's own template is Llama-3 style
    "llama3": (LLAMA3_TEXT, "<|eot_id|>"),
    "chatml": (CHATML_TEXT, "<|im_end|>"),
    "qwen": (CHATML_TEXT, "<|im_end|>"),  # has a system turn, so no default one is added
}
CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ASSETS))


def masked_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def check_mask(tok, ids, mask, text, eot):
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    # every token is accounted for: the whole sequence decodes to the hand-written text ...
    assert tok.decode(ids) == text
    # ... and the masked tokens are exactly the assistant replies, each with its end-of-turn token
    assert [tok.decode(r) for r in masked_runs(ids, mask)] == [a + eot for a in ANSWERS]
    # the token before each run closes the role header (never in the loss)
    starts = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
    assert all(tok.decode(ids[j - 1]).endswith("\n") for j in starts)
    # the end-of-turn token is a single special token, the last of each run
    eot_id = tok.convert_tokens_to_ids(eot)
    ends = [j for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
    assert [ids[j] for j in ends] == [eot_id, eot_id]


@pytest.mark.parametrize("template", ["auto", "llama3", "chatml", "qwen"])
def test_loss_mask_pinned(tok, template):
    text, eot = EXPECTED[template]
    ids, mask, truncated = tokenize_conversation(tok, CONV, template, 4096)
    assert not truncated
    check_mask(tok, ids, mask, text, eot)
    # reference computed another way: tokenizing the whole rendered string gives the same ids
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_qwen_adds_default_system_prompt(tok):
    conv = Conversation("c2", CONV.turns[1:])
    ids, mask, _ = tokenize_conversation(tok, conv, "qwen", 4096)
    check_mask(tok, ids, mask, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + CHATML_BODY,
               "<|im_end|>")
    ids_c, _, _ = tokenize_conversation(tok, conv, "chatml", 4096)
    assert tok.decode(ids_c) == CHATML_BODY


def test_auto_with_a_chatml_jinja_template_matches_named_chatml(tok):
    tok2 = load_tokenizer(str(ASSETS))
    tok2.chat_template = CHATML_JINJA
    auto = tokenize_conversation(tok2, CONV, "auto", 4096)
    assert auto == tokenize_conversation(tok, CONV, "chatml", 4096)
    check_mask(tok, auto[0], auto[1], CHATML_TEXT, "<|im_end|>")


def test_truncation(tok):
    ids, mask, _ = tokenize_conversation(tok, CONV, "llama3", 4096)
    cut = len(ids) - 3
    ids_t, mask_t, truncated = tokenize_conversation(tok, CONV, "llama3", cut)
    assert truncated and ids_t == ids[:cut] and mask_t == mask[:cut]


def test_generation_prompt(tok):
    ids = encode_prompt(tok, Conversation("p", CONV.turns[:2]), "auto")
    assert tok.decode(ids) == LLAMA3_TEXT.split("<|start_header_id|>assistant")[0] + (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids == encode_prompt(tok, Conversation("p", CONV.turns[:2]), "llama3")
    chatml = tok.decode(encode_prompt(tok, Conversation("p", CONV.turns[1:2]), "chatml"))
    assert chatml == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"


def test_auto_without_template_is_a_clear_error(tok):
    tok2 = load_tokenizer(str(ASSETS))
    tok2.chat_template = None
    with pytest.raises(DataError, match="has no chat_template"):
        tokenize_conversation(tok2, CONV, "auto", 100)


QWEN2_JINJA = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_auto_with_a_default_system_template_matches_named_qwen(tok):
    tok2 = load_tokenizer(str(ASSETS))
    tok2.chat_template = QWEN2_JINJA
    for conv in (CONV, Conversation("c2", CONV.turns[1:])):
        assert tokenize_conversation(tok2, conv, "auto", 4096) == tokenize_conversation(tok, conv, "qwen", 4096)


def test_named_template_needs_its_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specforge_core.config.schema import DatasetSection
    from specforge_core.data import build_samples

    raw = Tokenizer(models.WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(DataError, match=r"chat_template 'chatml' needs the special tokens \['<\|im_end\|>'"):
        build_samples(DatasetSection(path=[__file__], chat_template="chatml"), plain, use_cache=False)
