"""Chat templates: the built-in named ones, and finding assistant spans in the tokenizer's own.

A named template renders a conversation as a list of ``(text, is_loss)`` segments, so the loss
mask is exact by construction. ``"auto"`` renders with the tokenizer's jinja ``chat_template`` and
locates each assistant reply (content + the template's end-of-turn marker) as character spans.
"""

from __future__ import annotations

from typing import Optional

import attrs

from specforge_core.data.formats import Conversation, DataError

TEMPLATES = ("auto", "llama3", "chatml", "qwen", "qwen3", "gemma")
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"


@attrs.define(frozen=True)
class NamedTemplate:
    name: str
    bos: str  # text before the first turn
    header: str  # "{role}" is replaced; never in the loss
    end_of_turn: str  # closes every turn; in the loss for assistant turns
    after_turn: str  # text after end_of_turn (not in the loss)
    default_system: Optional[str] = None  # inserted when the conversation has no system turn
    trim: bool = False  # strip whitespace around contents (what Meta's template does)
    # Renders reasoning the Qwen3 way: "<think>\n{reasoning}\n</think>\n\n{answer}" on the
    # assistant turns after the last user message only (earlier turns' reasoning is not shown).
    thinks: bool = False
    # Role names the header uses instead of the message roles (Gemma says "model" for assistant).
    role_names: tuple[tuple[str, str], ...] = ()
    # No system turn: the system text + "\n\n" opens the first user turn (what Gemma's template does).
    system_in_first_user: bool = False

    def role(self, role: str) -> str:
        return dict(self.role_names).get(role, role)

    def generation_prompt(self, reasoning_mode: str = "keep") -> str:
        # Qwen3 with enable_thinking=False (what "drop" trains for) pre-fills an empty think block.
        empty = THINK_OPEN + THINK_CLOSE if self.thinks and reasoning_mode == "drop" else ""
        return self.header.format(role=self.role("assistant")) + empty

    def special_tokens(self) -> list[str]:
        return [t for t in (self.bos, self.end_of_turn) if t] + [
            p for p in ("<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<start_of_turn>") if p in self.header
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

# Qwen3 (and QwQ-style thinking ChatML models): no default system prompt, <think> blocks.
QWEN3 = attrs.evolve(CHATML, name="qwen3", thinks=True)

# Gemma 2/3 instruct: "model" is the assistant's role, contents trimmed, a system prompt is folded
# into the first user turn. Base Gemma checkpoints ship no template (the GGUF of 3 270M has none).
GEMMA = NamedTemplate(
    name="gemma",
    bos="<bos>",
    header="<start_of_turn>{role}\n",
    end_of_turn="<end_of_turn>",
    after_turn="\n",
    trim=True,
    role_names=(("assistant", "model"),),
    system_in_first_user=True,
)

NAMED_TEMPLATES = {t.name: t for t in (LLAMA3, CHATML, QWEN, QWEN3, GEMMA)}


def get_template(name: str) -> NamedTemplate:
    try:
        return NAMED_TEMPLATES[name]
    except KeyError:
        raise DataError(f"unknown chat_template {name!r} (allowed: {', '.join(TEMPLATES)})") from None


def render_segments(
    tpl: NamedTemplate, conv: Conversation, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The conversation as ``(text, is_loss)`` pieces; loss = what the target generates after the
    generation prompt: the reasoning block (when rendered), the answer and end_of_turn."""
    turns = list(conv.turns)
    if conv.has_reasoning and not tpl.thinks:
        raise DataError(
            f"{conv.source}: the conversation has reasoning content but chat_template {tpl.name!r} "
            "cannot render it; set [dataset] reasoning = \"drop\", or use chat_template 'qwen3' or 'auto' "
            "(a tokenizer template that renders reasoning_content)"
        )
    # Qwen3's rule: only assistant turns after the last user message show their reasoning.
    last_query = max((i for i, t in enumerate(turns) if t.role == "user"), default=len(turns) - 1)
    segs: list[tuple[str, bool]] = []
    if tpl.bos:
        segs.append((tpl.bos, False))
    prefix = ""  # system text folded into the first user turn (system_in_first_user)
    if tpl.system_in_first_user and turns and turns[0].role == "system":
        prefix, turns, last_query = turns[0].content + "\n\n", turns[1:], last_query - 1
    if tpl.default_system is not None and not any(t.role == "system" for t in turns):
        segs.append((tpl.header.format(role="system") + tpl.default_system + tpl.end_of_turn + tpl.after_turn, False))
    for i, t in enumerate(turns):
        content = t.content.strip() if tpl.trim else t.content
        is_loss = t.role == "assistant"
        if is_loss and tpl.thinks and i > last_query and (i == len(turns) - 1 or t.reasoning):
            reasoning = (t.reasoning or "").strip("\n")
            content = content.lstrip("\n")
            if reasoning or conv.reasoning_mode == "keep":
                # the target writes the think block itself: it is in the loss
                segs.append((tpl.header.format(role=tpl.role(t.role)), False))
                content = THINK_OPEN + reasoning + THINK_CLOSE + content
            else:  # "drop": the empty block is the generation prompt's (enable_thinking=False)
                segs.append((tpl.generation_prompt("drop"), False))
        else:
            segs.append((tpl.header.format(role=tpl.role(t.role)) + (prefix if i == 0 else ""), False))
        segs.append((content, is_loss))
        segs.append((tpl.end_of_turn, is_loss))
        if tpl.after_turn:
            segs.append((tpl.after_turn, False))
    if add_generation_prompt:
        segs.append((tpl.generation_prompt(conv.reasoning_mode), False))
    return [(s, m) for s, m in segs if s]


# ---- "auto": the tokenizer's own jinja template ------------------------------------------------


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool, reasoning_mode: str = "keep") -> str:
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or "the target"
        raise DataError(
            f"dataset.chat_template = 'auto' but the tokenizer of {where} has no chat_template (a base "
            f"model?); set a named one: {', '.join(TEMPLATES[1:])}"
        )
    # "drop" trains for the target's non-thinking mode: Qwen3's template then pre-fills an empty
    # think block in the generation prompt; templates without the switch ignore the variable.
    extra = {"enable_thinking": False} if reasoning_mode == "drop" else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def assistant_char_spans(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render with the tokenizer's template; return the text and the ``[start, end)`` character
    span of every assistant reply, including the end-of-turn marker that follows it.

    Found incrementally: when the prompt rendered up to turn i (with the generation prompt) is a
    prefix of the full text, the reply (reasoning block included) starts right after it; otherwise
    at its content. The end-of-turn marker is whatever the template writes right after the reply's
    content, minus trailing whitespace (for ChatML that is ``<|im_end|>`` without the newline).
    A turn's reasoning must appear when the template renders that turn last, or this raises: a
    template that silently drops ``reasoning_content`` would train on text the target never sees.
    """
    msgs = conv.messages()
    mode = conv.reasoning_mode

    def render(ms: list[dict], gen: bool) -> str:
        return apply_template(tokenizer, ms, add_generation_prompt=gen, reasoning_mode=mode)

    full = render(msgs, False)
    spans = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(msgs[:i], True) if i else ""
        start_search = len(prefix) if full.startswith(prefix) else cursor
        content = m["content"].strip()  # templates may trim; the stripped text is always present
        start = full.find(content, max(start_search, cursor)) if content else max(start_search, cursor)
        if start < 0:
            raise DataError(f"{conv.source}: assistant turn {i} not found in the rendered chat template")
        end = start + len(content)
        # What the template writes after this reply: render up to this turn and look after content.
        upto = render(msgs[: i + 1], False)
        reasoning = (m.get("reasoning_content") or "").strip()
        if reasoning and reasoning not in upto:
            raise DataError(
                f"{conv.source}: assistant turn {i} has reasoning content but the tokenizer's chat "
                "template does not render reasoning_content; set [dataset] reasoning = \"drop\" or "
                "use a template that renders it (e.g. chat_template = 'qwen3')"
            )
        if i and full.startswith(prefix) and max(start_search, cursor) <= start:
            # everything the template writes between the generation prompt and the answer (a
            # think block) is generated by the target: the reply starts at the prompt's end
            start = max(start_search, cursor)
        k = upto.rfind(content) + len(content) if content else len(prefix)
        eot = upto[k:].rstrip()
        if eot and full.startswith(eot, end):
            end += len(eot)
        spans.append((start, end))
        cursor = end
    return full, spans
