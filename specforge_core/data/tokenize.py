"""Conversation -> token ids + loss mask.

The loss mask is 1 exactly on the tokens of every assistant reply, including the reply's
end-of-turn token (``<|eot_id|>``, ``<|im_end|>``), and 0 on everything else (system and user
turns, role headers, BOS, padding).
"""

from __future__ import annotations

from specforge_core.data.formats import Conversation, DataError
from specforge_core.data.templates import (
    NamedTemplate,
    apply_template,
    assistant_char_spans,
    get_template,
    render_segments,
)


def check_template_tokens(tokenizer, tpl: NamedTemplate) -> None:
    """A named template's markers must be single (special) tokens of this tokenizer."""
    missing = [t for t in tpl.special_tokens() if len(_encode(tokenizer, t)) != 1]
    if missing:
        raise DataError(
            f"chat_template {tpl.name!r} needs the special tokens {missing}, which this tokenizer "
            "does not have as single tokens; use chat_template='auto' or another template"
        )


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_named(tokenizer, tpl: NamedTemplate, conv: Conversation) -> tuple[list[int], list[int]]:
    """Token ids segment by segment, so every token's mask bit is known without offsets."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_loss in render_segments(tpl, conv):
        seg = _encode(tokenizer, text)
        ids.extend(seg)
        mask.extend([int(is_loss)] * len(seg))
    return ids, mask


def tokenize_auto(tokenizer, conv: Conversation) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's own template; a token is in the loss if its characters overlap
    an assistant span (needs a fast tokenizer for ``return_offsets_mapping``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat_template='auto' needs a fast tokenizer (offsets); pick a named template")
    text, spans = assistant_char_spans(tokenizer, conv)
    # The template already wrote BOS etc.; HF's apply_chat_template(tokenize=True) does the same.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _mask_from_offsets(enc["offset_mapping"], spans)


def tokenize_conversation(
    tokenizer, conv: Conversation, chat_template: str, max_seq_length: int
) -> tuple[list[int], list[int], bool]:
    """Returns ``(input_ids, loss_mask, was_truncated)``."""
    if chat_template == "auto":
        ids, mask = tokenize_auto(tokenizer, conv)
    else:
        ids, mask = tokenize_named(tokenizer, get_template(chat_template), conv)
    truncated = len(ids) > max_seq_length
    return ids[:max_seq_length], mask[:max_seq_length], truncated


def _mask_from_offsets(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap an assistant span (both sorted by position)."""
    mask = [0] * len(offsets)
    si = 0
    for j, (a, b) in enumerate(offsets):
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        if si < len(spans) and b > a and a < spans[si][1] and b > spans[si][0]:
            mask[j] = 1
    return mask


def _encode_many(tokenizer, texts: list[str], **kw) -> dict:
    # one call for many texts: a fast tokenizer encodes the batch on all cores (Rust threads)
    return tokenizer(texts, add_special_tokens=False, **kw) if texts else {"input_ids": [], "offset_mapping": []}


def tokenize_batch(
    tokenizer, convs: list[Conversation], chat_template: str, max_seq_length: int
) -> list[tuple[list[int], list[int], bool]]:
    """``tokenize_conversation`` for many conversations at once, with the same result for each
    (tested), but one tokenizer call per batch instead of one per conversation or segment."""
    out: list[tuple[list[int], list[int], bool]] = []
    if chat_template == "auto":
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("chat_template='auto' needs a fast tokenizer (offsets); pick a named template")
        rendered = [assistant_char_spans(tokenizer, conv) for conv in convs]
        enc = _encode_many(tokenizer, [text for text, _ in rendered], return_offsets_mapping=True)
        pairs = [
            (list(ids), _mask_from_offsets(offsets, spans))
            for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True)
        ]
    else:
        tpl = get_template(chat_template)
        segments = [list(render_segments(tpl, conv)) for conv in convs]
        flat = _encode_many(tokenizer, [text for segs in segments for text, _ in segs])["input_ids"]
        pairs, k = [], 0
        for segs in segments:
            ids: list[int] = []
            mask: list[int] = []
            for _, is_loss in segs:
                ids.extend(flat[k])
                mask.extend([int(is_loss)] * len(flat[k]))
                k += 1
            pairs.append((ids, mask))
    for ids, mask in pairs:
        out.append((ids[:max_seq_length], mask[:max_seq_length], len(ids) > max_seq_length))
    return out


def encode_prompt(tokenizer, conv: Conversation, chat_template: str) -> list[int]:
    """The conversation followed by the assistant generation prompt (for generation / eval)."""
    if chat_template == "auto":
        text = apply_template(tokenizer, conv.messages(), add_generation_prompt=True,
                              reasoning_mode=conv.reasoning_mode)
        return _encode(tokenizer, text)
    tpl = get_template(chat_template)
    ids: list[int] = []
    for text, _ in render_segments(tpl, conv, add_generation_prompt=True):
        ids.extend(_encode(tokenizer, text))
    return ids
