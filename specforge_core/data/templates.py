"""Chat templates: the built-in named ones, and finding assistant spans in the tokenizer's own.

A named template renders a conversation as a list of ``(text, is_loss)`` segments, so the loss
mask is exact by construction. ``"auto"`` renders with the tokenizer's jinja ``chat_template`` and
locates each assistant reply (content + the template's end-of-turn marker) as character spans.
"""

from __future__ import annotations

from typing import Optional

import attrs

from specforge_core.data.formats import Conversation, DataError

TEMPLATES = ("auto", "llama3", "chatml", "qwen")


@attrs.define(frozen=True)
class NamedTemplate:
    name: str
    bos: str  # text before the first turn
    header: str  # "{role}" is replaced; never in the loss
    end_of_turn: str  # closes every turn; in the loss for assistant turns
    after_turn: str  # text after end_of_turn (not in the loss)
    default_system: Optional[str] = None  # inserted when the conversation has no system turn
    trim: bool = False  # strip whitespace around contents (what Meta's template does)

    def generation_prompt(self) -> str:
        return self.header.format(role="assistant")

    def special_tokens(self) -> list[str]:
        return [t for t in (self.bos, self.end_of_turn) if t] + [
            p for p in ("<|start_header_id|>", "<|end_header_id|>", "<|im_start|>") if p in self.header
        ]


LLAMA3 = NamedTemplate(
    name="llama3",
    bos="<|begin_of_text|>",
    header="<|start_header_id|>{role}<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
    after_turn="",
    trim=True,
)
CHATML = NamedTemplate(
    name="chatml",
    bos="",
    header="<|im_start|>{role}\n",
    end_of_turn="<|im_end|>",
    after_turn="\n",
)
# Qwen2 / Qwen2.5 instruct: ChatML plus a default system prompt when none is given.
# (Qwen2.5's own template words it "You are Qwen, created by Alibaba Cloud. ..."; Qwen3 has no
# default system prompt and adds <think> handling: use "auto" for those.)
QWEN = attrs.evolve(CHATML, name="qwen", default_system="You are a helpful assistant.")

NAMED_TEMPLATES = {t.name: t for t in (LLAMA3, CHATML, QWEN)}


def get_template(name: str) -> NamedTemplate:
    try:
        return NAMED_TEMPLATES[name]
    except KeyError:
        raise DataError(f"unknown chat_template {name!r} (allowed: {', '.join(TEMPLATES)})") from None


def render_segments(
    tpl: NamedTemplate, conv: Conversation, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The conversation as ``(text, is_loss)`` pieces; loss = assistant content + end_of_turn."""
    turns = list(conv.turns)
    segs: list[tuple[str, bool]] = []
    if tpl.bos:
        segs.append((tpl.bos, False))
    if tpl.default_system is not None and not any(t.role == "system" for t in turns):
        segs.append((tpl.header.format(role="system") + tpl.default_system + tpl.end_of_turn + tpl.after_turn, False))
    for t in turns:
        content = t.content.strip() if tpl.trim else t.content
        segs.append((tpl.header.format(role=t.role), False))
        is_loss = t.role == "assistant"
        segs.append((content, is_loss))
        segs.append((tpl.end_of_turn, is_loss))
        if tpl.after_turn:
            segs.append((tpl.after_turn, False))
    if add_generation_prompt:
        segs.append((tpl.generation_prompt(), False))
    return [(s, m) for s, m in segs if s]


# ---- "auto": the tokenizer's own jinja template ------------------------------------------------


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat_template='auto' but the tokenizer has no chat_template; "
            f"pick one of: {', '.join(TEMPLATES[1:])}"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render with the tokenizer's template; return the text and the ``[start, end)`` character
    span of every assistant reply, including the end-of-turn marker that follows it.

    Found incrementally: the prompt rendered up to turn i (with the generation prompt) must be a
    prefix of the full text, so the reply starts after it; the end-of-turn marker is whatever the
    template writes right after the reply's content, minus trailing whitespace (for ChatML that is
    ``<|im_end|>`` without the newline).
    """
    msgs = conv.messages()
    full = apply_template(tokenizer, msgs, add_generation_prompt=False)
    spans = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = apply_template(tokenizer, msgs[:i], add_generation_prompt=True) if i else ""
        start_search = len(prefix) if full.startswith(prefix) else cursor
        content = m["content"].strip()  # templates may trim; the stripped text is always present
        start = full.find(content, max(start_search, cursor)) if content else max(start_search, cursor)
        if start < 0:
            raise DataError(f"{conv.source}: assistant turn {i} not found in the rendered chat template")
        end = start + len(content)
        # What the template writes after this reply: render up to this turn and look after content.
        upto = apply_template(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        k = upto.rfind(content) + len(content) if content else len(prefix)
        eot = upto[k:].rstrip()
        if eot and full.startswith(eot, end):
            end += len(eot)
        spans.append((start, end))
        cursor = end
    return full, spans
