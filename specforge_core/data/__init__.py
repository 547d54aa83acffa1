"""Conversation data: reading files, chat templates with loss masks, cached tokenization.

Public API (used by trainers and the evaluator)::

    tokenizer = load_tokenizer(cfg.model.target)
    samples, stats = build_samples(cfg.dataset, tokenizer)
    prompts = load_prompts(cfg.eval.data, tokenizer, cfg.dataset.chat_template, cfg.dataset.max_seq_length)
"""

from specforge_core.data.build import Prompt, build_samples, load_prompts, load_tokenizer
from specforge_core.data.formats import (
    Conversation,
    DataError,
    DataStats,
    Turn,
    load_conversations,
    parse_record,
)
from specforge_core.data.templates import NAMED_TEMPLATES, TEMPLATES, NamedTemplate, render_segments
from specforge_core.data.tokenize import encode_prompt, tokenize_conversation

__all__ = [
    "Conversation",
    "DataError",
    "DataStats",
    "NAMED_TEMPLATES",
    "NamedTemplate",
    "Prompt",
    "TEMPLATES",
    "Turn",
    "build_samples",
    "encode_prompt",
    "load_conversations",
    "load_prompts",
    "load_tokenizer",
    "parse_record",
    "render_segments",
    "tokenize_conversation",
]
