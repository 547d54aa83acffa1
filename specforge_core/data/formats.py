"""Reading conversation files: JSONL or a JSON list, ShareGPT or OpenAI style.

Every record becomes a :class:`Conversation` of normalised turns (roles ``system``, ``user``,
``assistant``). A bad record never crashes a long run silently: it raises (``on_error="stop"``) or
is counted and remembered (``on_error="skip"``), always with ``file:line`` in the message.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import attrs

log = logging.getLogger(__name__)

FORMATS = ("auto", "sharegpt", "openai")
ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # real ShareGPT exports also name the assistant after the product that answered
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
MAX_ERRORS_KEPT = 10
# First line of a `specforge data regenerate` output: its inputs and settings, not a conversation
REGENERATE_HEADER = "specforge_regenerate_header"


class DataError(ValueError):
    """A malformed data file or record; the message names the file and line."""


REASONING_MODES = ("keep", "drop")
_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>", re.DOTALL)


@attrs.define
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str
    # An assistant turn's reasoning, from `reasoning_content`, `thinking` or a leading
    # <think>...</think> block of `content` (removed from content); None when it has none.
    reasoning: Optional[str] = None


@attrs.define
class Conversation:
    sample_id: str
    turns: list[Turn]
    category: Optional[str] = None
    source: str = ""  # "file:line", for error messages
    reasoning_mode: str = "keep"  # [dataset] reasoning: "keep" renders reasoning, "drop" removed it

    @property
    def has_reasoning(self) -> bool:
        return any(t.reasoning is not None for t in self.turns)

    @property
    def has_assistant(self) -> bool:
        return any(t.role == "assistant" for t in self.turns)

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style message dicts (what ``tokenizer.apply_chat_template`` takes)."""
        msgs: list[dict[str, str]] = []
        for t in self.turns:
            m = {"role": t.role, "content": t.content}
            if t.reasoning is not None:
                # Qwen3's template reads reasoning_content, gpt-oss's (harmony analysis channel) thinking
                m["reasoning_content"] = m["thinking"] = t.reasoning
            msgs.append(m)
        return msgs

    def drop_reasoning(self) -> None:
        for t in self.turns:
            t.reasoning = None
        self.reasoning_mode = "drop"


@attrs.define
class DataStats:
    """Counts from loading + tokenizing; ``errors`` keeps the first few messages."""

    lines: int = 0  # records read (JSONL lines that are not blank, or JSON list items)
    samples: int = 0  # samples produced
    skipped_no_assistant: int = 0
    skipped_malformed: int = 0
    skipped_no_loss: int = 0  # nothing left to learn after truncation
    truncated: int = 0
    over_max_samples: int = 0  # tokenized samples past dataset.max_samples (left out after tokenizing)
    errors: list[str] = attrs.field(factory=list)
    from_cache: bool = False

    def record_error(self, msg: str) -> None:
        self.skipped_malformed += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(msg)

    def summary(self) -> str:
        """One line whose numbers add up: records in -> samples, every record left out by its reason."""
        limit = (f" (dataset.max_samples: the first {self.samples} of {self.samples + self.over_max_samples} "
                 "tokenized)" if self.over_max_samples else "")
        return (
            f"{self.samples} samples from {self.lines} records{limit}; skipped: "
            f"{self.skipped_no_assistant} without assistant turn, {self.skipped_malformed} malformed, "
            f"{self.skipped_no_loss} empty after truncation; {self.truncated} truncated"
        )


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)``; a record that is not valid JSON is yielded as a DataError.

    A file whose first non-blank character is ``[`` is one JSON list (the item's line is where it
    starts); anything else is JSONL (one object per line, blank lines ignored).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file: {e}") from e
    if raw.lstrip().startswith(b"["):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # one JSON document: no record to skip to
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from e
        yield from _iter_json_list(path, text)
        return
    # JSONL records end at '\n' only: str.splitlines() would also split inside JSON strings at
    # U+2028, U+0085 and the like (real ShareGPT text has them), dropping records and shifting
    # every later line number. Each line is decoded on its own so one bad byte costs one record.
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, DataError(f"{path}:{lineno}: not UTF-8 at byte {e.start} ({e.reason})")
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")


def _iter_json_list(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        # The whole list is unusable; there is no record to skip to.
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(items, list):
        raise DataError(f"{path}:1: expected a JSON list of conversations")
    # Recover each item's start line cheaply: raw_decode walks the items in order.
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    for item in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        lineno = text.count("\n", 0, pos) + 1
        _, pos = dec.raw_decode(text, pos)
        yield lineno, item


def detect_format(record: dict) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    raise ValueError("record has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI) key")


def _content_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": "..."}]
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise ValueError(f"{where}: content must be a string, got {type(value).__name__}")


def _split_reasoning(turn: dict, content: str, where: str) -> tuple[str, Optional[str]]:
    """One assistant turn's ``(content, reasoning)``: the three accepted forms become one field."""
    fields = [k for k in ("reasoning_content", "thinking") if turn.get(k) is not None]
    m = _THINK_RE.match(content)
    if len(fields) + bool(m) > 1:
        found = fields + (["<think> block in content"] if m else [])
        raise ValueError(f"{where}: reasoning given twice ({' and '.join(found)}); keep one")
    if fields:
        value = turn[fields[0]]
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{fields[0]}' must be a string, got {type(value).__name__}")
        return content, value
    if m:
        # Qwen3's and DeepSeek-R1's templates strip the newlines around the reasoning and before
        # the answer; done here too so every form gives the same turn.
        return content[m.end():].lstrip("\n"), m.group(1).strip("\n")
    return content, None


def parse_record(record: Any, fmt: str = "auto", default_id: str = "") -> Conversation:
    """Turn one JSON record into a Conversation; raises ValueError describing what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    style = detect_format(record) if fmt == "auto" else fmt
    key, role_key, text_key = {
        "sharegpt": ("conversations", "from", "value"),
        "openai": ("messages", "role", "content"),
    }[style]
    raw_turns = record.get(key)
    if not isinstance(raw_turns, list):
        raise ValueError(f"'{key}' must be a list of turns ({style} format)")
    turns = []
    for i, t in enumerate(raw_turns):
        where = f"turn {i}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: expected an object with '{role_key}' and '{text_key}'")
        if role_key not in t or text_key not in t:
            raise ValueError(f"{where}: missing '{role_key}' or '{text_key}' ({style} format)")
        role = t[role_key]
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise ValueError(f"{where}: unknown role {role!r} (allowed: {', '.join(ROLE_ALIASES)})")
        role = ROLE_ALIASES[role.lower()]
        content = _content_text(t[text_key], where)
        reasoning = None
        if role == "assistant":
            content, reasoning = _split_reasoning(t, content, where)
        turns.append(Turn(role, content, reasoning))
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise ValueError(f"'category' must be a string, got {type(category).__name__}")
    rid = record.get("id")
    sample_id = str(rid) if rid is not None else default_id
    return Conversation(sample_id=sample_id, turns=turns, category=category)


def load_conversations(
    paths: Sequence[str | Path],
    fmt: str = "auto",
    on_error: str = "skip",
    stats: Optional[DataStats] = None,
    require_assistant: bool = True,
    reasoning: str = "keep",
) -> tuple[list[Conversation], DataStats]:
    """Read every file in order. Conversations without an assistant turn are skipped and counted
    when ``require_assistant`` (training); prompts for evaluation keep them. ``reasoning="drop"``
    removes every assistant turn's reasoning (see docs/data.md, "Reasoning content")."""
    if reasoning not in REASONING_MODES:
        raise DataError(f"unknown reasoning {reasoning!r} (allowed: {', '.join(REASONING_MODES)})")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (allowed: {', '.join(FORMATS)})")
    if on_error not in ("skip", "stop"):
        raise DataError(f"unknown on_error {on_error!r} (allowed: skip, stop)")
    stats = stats if stats is not None else DataStats()
    convs: list[Conversation] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        for lineno, rec in iter_records(path):
            if lineno == 1 and isinstance(rec, dict) and REGENERATE_HEADER in rec:
                continue
            stats.lines += 1
            where = f"{path}:{lineno}"
            try:
                if isinstance(rec, DataError):
                    raise rec
                conv = parse_record(rec, fmt, default_id=f"{path.stem}:{lineno}")
            except (ValueError, KeyError) as e:
                msg = str(e) if isinstance(e, DataError) else f"{where}: {e}"
                if on_error == "stop":
                    raise DataError(msg) from e
                log.warning("skipping malformed record: %s", msg)
                stats.record_error(msg)
                continue
            conv.source = where
            if reasoning == "drop":
                conv.drop_reasoning()
            if require_assistant and not conv.has_assistant:
                stats.skipped_no_assistant += 1
                continue
            convs.append(conv)
    return convs, stats
