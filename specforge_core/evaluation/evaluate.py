"""``evaluate``: acceptance length of an exported draft against an HF target, no serving engine."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from specforge_core.evaluation.accounting import AcceptStats
from specforge_core.evaluation.fast import fast_speculate
from specforge_core.evaluation.report import EvalReport, PromptReport
from specforge_core.evaluation.speculate import ChainProposer, GreedyVerifier, speculate
from specforge_core.evaluation.target import TargetModel, eos_token_ids


def export_aux_layers(draft_dir: str | Path, num_layers: int, convention: str = "sglang") -> Optional[list[int]]:
    """HF hidden_states indices named by an export's config.json (None = the default layers).

    The top-level ``eagle_aux_hidden_state_layer_ids`` is in HF numbering (vLLM's). Exports made
    before it was written hold the ids only under ``eagle_config``, in the numbering their
    ``aux_ids_convention`` chose: SGLang's (HF index - 1) by default, ``convention`` says which."""
    if convention not in ("sglang", "vllm"):
        raise ValueError(f"aux ids convention '{convention}' is not known; allowed: sglang, vllm")
    path = Path(draft_dir) / "config.json"
    raw = json.loads(path.read_text())
    top = raw.get("eagle_aux_hidden_state_layer_ids")
    eagle = raw.get("eagle_config") if isinstance(raw.get("eagle_config"), dict) else {}
    if top:
        hf, where = [int(i) for i in top], "eagle_aux_hidden_state_layer_ids (HF numbering)"
    elif eagle.get("eagle_aux_hidden_state_layer_ids"):
        ids = eagle["eagle_aux_hidden_state_layer_ids"]
        hf = [int(i) + (1 if convention == "sglang" else 0) for i in ids]
        where = f"eagle_config.eagle_aux_hidden_state_layer_ids {ids} ({convention} convention)"
    else:
        return None
    bad = [i for i in hf if not 1 <= i <= num_layers - 1]
    if bad:
        raise ValueError(f"{path}: {where} name HF layers {hf}, outside 1..{num_layers - 1} of this target")
    return hf


def resolve_prompts(prompts: Any, target: str, tokenizer=None, chat_template: str = "auto",
                    max_seq_length: int = 2048):
    """Prompts as given (``Prompt`` objects or token-id lists) or loaded from conversation files."""
    from specforge_core.data import Prompt, load_prompts, load_tokenizer

    if isinstance(prompts, (str, Path)):
        prompts = [prompts]
    if prompts and all(isinstance(p, (str, Path)) for p in prompts):
        tokenizer = tokenizer or load_tokenizer(target)
        return load_prompts([str(p) for p in prompts], tokenizer, chat_template, max_seq_length)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append(p)
        else:
            out.append(Prompt(f"prompt-{i}", torch.as_tensor(p, dtype=torch.int64)))
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[str]:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"token {i}: speculative {x} != greedy {y}"
    if len(a) != len(b):
        return f"lengths differ: speculative {len(a)} tokens, greedy {len(b)}"
    return None


def evaluate(
    draft_dir: str | Path,
    target: str,
    prompts: Any,
    steps: int = 3,
    max_new_tokens: int = 128,
    *,
    fast: bool = False,
    check: bool = True,
    aux_layers: Optional[Sequence[int]] = None,
    aux_ids_convention: str = "sglang",
    eos_ids: Optional[Sequence[int]] = None,
    device: Optional[str] = None,
    dtype: str = "fp32",
    tokenizer=None,
    chat_template: str = "auto",
    max_seq_length: int = 2048,
    max_prompts: Optional[int] = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> EvalReport:
    """Greedy chain speculation with ``steps`` draft tokens per cycle on every prompt.

    ``prompts``: conversation files (their last assistant turn is dropped), ``Prompt`` objects, or
    token-id lists. ``fast``: teacher-forced counts (same numbers, no guard). ``check``: also run
    plain greedy decoding and record any token difference as an error (``report.ok``).
    ``eos_ids``: stop tokens (default: the target's eos ids); ``()`` disables EOS."""
    from specforge_llama_eagle3.model import LlamaEagle3Draft

    from specforge_core.target import load_target_config, resolve_aux_layers

    if steps < 1 or max_new_tokens < 1:
        raise ValueError(f"steps ({steps}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    num_layers = int(load_target_config(target, trust_remote_code)["num_hidden_layers"])
    if aux_layers is None:
        aux_layers = export_aux_layers(draft_dir, num_layers, aux_ids_convention) or ()
    aux_layers = resolve_aux_layers(aux_layers, num_layers)

    items = resolve_prompts(prompts, target, tokenizer, chat_template, max_seq_length)
    if max_prompts is not None:
        items = items[:max_prompts]
    if not items:
        raise ValueError(f"no prompts to evaluate (from {prompts!r})")
    if eos_ids is None:
        eos_ids = eos_token_ids(target, tokenizer)

    tm = TargetModel(target, aux_layers, device, dtype, trust_remote_code)
    draft = LlamaEagle3Draft.from_export(draft_dir, embed_weight=tm.embedding.detach().float().cpu(),
                                         dtype=tm.dtype).to(tm.device).eval()
    expect = len(aux_layers) * int(tm.model.config.hidden_size)
    if draft.fc.weight.shape[1] != expect:
        raise ValueError(f"{draft_dir}: the draft's fc takes {draft.fc.weight.shape[1]} features but "
                         f"{len(aux_layers)} aux layers of this target give {expect}")
    proposer = ChainProposer(draft, draft.d2t, tm.device)
    verifier = GreedyVerifier(tm)

    overall = AcceptStats(steps)
    categories: dict[str, AcceptStats] = {}
    reports: list[PromptReport] = []
    for p in _progress(items, progress):
        ids = p.input_ids.tolist()
        if fast:
            output = tm.greedy(ids, max_new_tokens, eos_ids)
            res = fast_speculate(ids, output, draft, proposer.draft_to_target, tm, steps)
            mismatch = None
        else:
            res = speculate(ids, proposer, verifier, steps, max_new_tokens, eos_ids)
            mismatch = first_difference(res.output, tm.greedy(ids, max_new_tokens, eos_ids)) if check else None
        stats = AcceptStats(steps)
        for accepted, committed in res.cycles:
            stats.add_cycle(accepted, committed)
        overall.merge(stats)
        if p.category:
            categories.setdefault(p.category, AcceptStats(steps)).merge(stats)
        reports.append(PromptReport(p.sample_id, p.category, len(ids), len(res.output), stats, mismatch))
    return EvalReport(str(draft_dir), target, steps, max_new_tokens, "fast" if fast else "exact",
                      overall, categories, reports, time.perf_counter() - t0)


def _progress(items, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description="eval")
