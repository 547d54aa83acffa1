"""Files -> tokenized Samples (with an on-disk cache), tokenizer loading, eval prompts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import attrs
import torch

from specforge_core.config.schema import DatasetSection
from specforge_core.data import tokenize as tok
from specforge_core.data.formats import DataError, DataStats, load_conversations
from specforge_core.data.templates import TEMPLATES, get_template
from specforge_core.files import file_sha256
from specforge_core.types import Sample

log = logging.getLogger(__name__)

# Bump when tokenization or the cache layout changes: old caches are then ignored.
CACHE_VERSION = 1


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The target's tokenizer (fast when available; offsets need it for chat_template='auto')."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {model_path!r}: {e}") from e


# ---- cache keys --------------------------------------------------------------------------------


def tokenizer_identity(tokenizer) -> str:
    """A hash of everything in the tokenizer that changes token ids or the template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocab and added tokens
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(cfg: DatasetSection, tokenizer, paths: Sequence[Path]) -> str:
    parts = {
        "version": CACHE_VERSION,
        "files": [file_sha256(p) for p in paths],
        "tokenizer": tokenizer_identity(tokenizer),
        "format": cfg.format,
        "chat_template": cfg.chat_template,
        "reasoning": cfg.reasoning,
        "max_seq_length": cfg.max_seq_length,
        "on_error": cfg.on_error,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _save_cache(path: Path, samples: list[Sample], stats: DataStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "input_ids": torch.cat([s.input_ids for s in samples]) if samples else torch.zeros(0, dtype=torch.int64),
        "loss_mask": torch.cat([s.loss_mask for s in samples]) if samples else torch.zeros(0, dtype=torch.uint8),
        "lengths": torch.tensor([s.num_tokens for s in samples], dtype=torch.int64),
        "meta": json.dumps(
            {"ids": [s.sample_id for s in samples], "categories": [s.category for s in samples],
             "stats": attrs.asdict(stats)}
        ),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crashed writer never leaves a half cache behind


def _load_cache(path: Path) -> tuple[list[Sample], DataStats]:
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    ids = payload["input_ids"].split(payload["lengths"].tolist())
    masks = payload["loss_mask"].split(payload["lengths"].tolist())
    samples = [
        Sample(sample_id=sid, input_ids=i.clone(), loss_mask=m.clone(), category=cat)
        for sid, cat, i, m in zip(meta["ids"], meta["categories"], ids, masks, strict=True)
    ]
    stats = DataStats(**meta["stats"])
    stats.from_cache = True
    return samples, stats


# ---- samples -----------------------------------------------------------------------------------


TOKENIZE_CHUNK = 256  # conversations per tokenizer call: big enough for the batch to use every core


def tokenize_all(
    cfg: DatasetSection, tokenizer, paths: Sequence[Path], progress: bool = False
) -> tuple[list[Sample], DataStats]:
    if cfg.chat_template not in TEMPLATES:
        raise DataError(f"unknown chat_template {cfg.chat_template!r} (allowed: {', '.join(TEMPLATES)})")
    if cfg.chat_template != "auto":
        tok.check_template_tokens(tokenizer, get_template(cfg.chat_template))
    convs, stats = load_conversations(paths, cfg.format, cfg.on_error, reasoning=cfg.reasoning)
    chunks = [convs[i : i + TOKENIZE_CHUNK] for i in range(0, len(convs), TOKENIZE_CHUNK)]
    args = (cfg.chat_template, cfg.max_seq_length)
    results = []
    with _progress(progress) as bar, _pool(tokenizer, len(convs)) as pool:
        task = bar.add_task("tokenize", total=len(convs))
        done = pool.map(_tokenize_chunk, chunks, [args] * len(chunks)) if pool else (
            tok.tokenize_batch(tokenizer, c, *args) for c in chunks)
        for chunk, out in zip(chunks, done, strict=True):  # in order, as each chunk finishes
            results += out
            bar.advance(task, len(chunk))
    samples = []
    for conv, (ids, mask, truncated) in zip(convs, results, strict=True):
        stats.truncated += int(truncated)
        if not any(mask):
            stats.skipped_no_loss += 1
            continue
        samples.append(
            Sample(
                sample_id=conv.sample_id,
                input_ids=torch.tensor(ids, dtype=torch.int64),
                loss_mask=torch.tensor(mask, dtype=torch.uint8),
                category=conv.category,
            )
        )
    stats.samples = len(samples)
    return samples, stats


PARALLEL_MIN = 2048  # below this many conversations a process pool costs more than it saves
_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_chunk(chunk, args):
    return tok.tokenize_batch(_worker_tokenizer, chunk, *args)


def _pool(tokenizer, n_convs: int):
    """Worker processes for tokenizing: rendering a chat template (Jinja, once per assistant turn
    for the loss spans) is Python and dominates, so threads would not help. ``fork`` (as torch's
    DataLoader workers): ``spawn`` would re-import the caller's ``__main__`` in every worker.
    None: tokenize in this process."""
    import concurrent.futures as cf
    import contextlib
    import multiprocessing as mp

    wanted = int(os.environ.get("SPECFORGE_TOKENIZE_WORKERS") or min(os.cpu_count() or 1, 8))
    workers = min(wanted, n_convs // TOKENIZE_CHUNK)
    if n_convs < PARALLEL_MIN or workers < 2:
        return contextlib.nullcontext(None)
    return cf.ProcessPoolExecutor(workers, mp.get_context("fork"), initializer=_init_worker, initargs=(tokenizer,))


def _progress(enabled: bool):
    """A rich bar on stderr (disabled: a no-op with the same calls)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def build_samples(
    cfg: DatasetSection, tokenizer, *, paths: Optional[Sequence[str | Path]] = None, use_cache: bool = True,
    progress: bool = False,
) -> tuple[list[Sample], DataStats]:
    """Load + tokenize the dataset files (``paths`` overrides ``cfg.path``), cached under
    ``cfg.cache_dir`` by a hash of the file contents, the tokenizer and the settings.

    ``cfg.max_samples`` is applied after the cache (it does not change the key). ``progress``: show
    a bar while tokenizing (the result and the cache do not depend on it)."""
    files = [Path(p) for p in (paths if paths is not None else cfg.path)]
    if not files:
        raise DataError("dataset.path is empty: give at least one JSONL/JSON conversation file")
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: data file not found (dataset.path)")
    cache_file = None
    if use_cache and cfg.cache_dir:
        cache_file = Path(cfg.cache_dir) / f"samples-{cache_key(cfg, tokenizer, files)}.pt"
        if cache_file.is_file():
            try:
                samples, stats = _load_cache(cache_file)
                log.info("loaded %d tokenized samples from cache %s", len(samples), cache_file)
                return _limit(samples, stats, cfg.max_samples)
            except Exception as e:  # a corrupt cache is rebuilt, not fatal
                log.warning("ignoring unreadable cache %s: %s", cache_file, e)
    # a large dataset takes minutes: say what starts (the bar, when on, shows how far it is)
    log.info("tokenizing %s (%.1f MB)%s", ", ".join(str(f) for f in files), sum(f.stat().st_size for f in files) / 1e6,
             f"; the result is cached in {cache_file}" if cache_file is not None else "")
    samples, stats = tokenize_all(cfg, tokenizer, files, progress=progress)
    log.info("tokenized %s: %s", ", ".join(str(f) for f in files), stats.summary())
    if cache_file is not None:
        _save_cache(cache_file, samples, stats)
    return _limit(samples, stats, cfg.max_samples)


def _limit(samples: list[Sample], stats: DataStats, max_samples: Optional[int]):
    if max_samples is not None and len(samples) > max_samples:
        stats.over_max_samples = len(samples) - max_samples  # the summary says why there are fewer
        samples = samples[:max_samples]
        stats.samples = len(samples)
    return samples, stats


# ---- eval prompts ------------------------------------------------------------------------------


@attrs.define
class Prompt:
    """A conversation to continue: ``input_ids`` ends with the assistant generation prompt."""

    sample_id: str
    input_ids: torch.Tensor  # int64 [T]
    category: Optional[str] = None
    reference_text: Optional[str] = None  # the dropped final assistant reply, if there was one


def load_prompts(
    paths: Sequence[str | Path], tokenizer, chat_template: str = "auto", max_seq_length: int = 2048,
    fmt: str = "auto", on_error: str = "skip", reasoning: str = "keep",
) -> list[Prompt]:
    """Prompts for generation: if a conversation ends with an assistant turn, that turn is dropped
    (and kept as ``reference_text``); the rest is rendered with the generation prompt appended.
    Prompts longer than ``max_seq_length`` keep their last ``max_seq_length`` tokens."""
    if chat_template != "auto":
        tok.check_template_tokens(tokenizer, get_template(chat_template))
    # "drop": history turns lose their reasoning and the prompt is the non-thinking one (docs/data.md)
    convs, stats = load_conversations(paths, fmt, on_error, require_assistant=False, reasoning=reasoning)
    prompts = []
    for conv in convs:
        reference = None
        if conv.turns and conv.turns[-1].role == "assistant":
            reference = conv.turns[-1].content
            conv = attrs.evolve(conv, turns=conv.turns[:-1])
        if not any(t.role == "user" for t in conv.turns):
            stats.skipped_no_assistant += 1  # nothing to answer
            continue
        ids = tok.encode_prompt(tokenizer, conv, chat_template)[-max_seq_length:]
        prompts.append(Prompt(conv.sample_id, torch.tensor(ids, dtype=torch.int64), conv.category, reference))
    if stats.skipped_malformed:
        log.warning("load_prompts skipped %d malformed records: %s", stats.skipped_malformed, stats.errors[:3])
    return prompts
