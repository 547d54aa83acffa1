"""``evaluate``: acceptance length of an exported draft, in-process (HF target) or in a serving engine."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from specforge_core.evaluation.accounting import AcceptStats, stats_from_cycles
from specforge_core.evaluation.fast import fast_speculate
from specforge_core.evaluation.proposers import load_proposer
from specforge_core.evaluation.report import EvalReport, PromptReport
from specforge_core.evaluation.speculate import greedy_batch, speculate_batch
from specforge_core.evaluation.target import TargetModel, eos_token_ids
from specforge_core.target import resolve_aux_layers


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
                    max_seq_length: int = 2048, reasoning: str = "keep"):
    """Prompts as given (``Prompt`` objects or token-id lists) or loaded from conversation files."""
    from specforge_core.data import Prompt, load_prompts, load_tokenizer

    if isinstance(prompts, (str, Path)):
        prompts = [prompts]
    if prompts and all(isinstance(p, (str, Path)) for p in prompts):
        tokenizer = tokenizer or load_tokenizer(target)
        return load_prompts([str(p) for p in prompts], tokenizer, chat_template, max_seq_length,
                            reasoning=reasoning)
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
    aux_ids_convention: Optional[str] = None,
    eos_ids: Optional[Sequence[int]] = None,
    device: Optional[str] = None,
    dtype: str = "fp32",
    tokenizer=None,
    chat_template: str = "auto",
    max_seq_length: int = 2048,
    reasoning: str = "keep",
    max_prompts: Optional[int] = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    batch_size: int = 16,
    algorithm: Optional[str] = None,
    proposer: Any = None,
    engine: str = "hf",
    engine_python: Optional[str] = None,
    registry: Any = None,
) -> EvalReport:
    """Greedy speculation with ``steps`` draft tokens per cycle on every prompt.

    ``prompts``: conversation files (their last assistant turn is dropped), ``Prompt`` objects, or
    token-id lists. ``fast``: teacher-forced counts (same numbers, no guard). ``check``: also run
    plain greedy decoding and record any token difference as an error (``report.ok``).
    ``eos_ids``: stop tokens (default: the target's eos ids); ``()`` disables EOS.
    ``batch_size``: prompts per target forward (hf engine). ``algorithm``: the draft algorithm
    whose proposer drafts (default: found from the export's architecture); ``proposer``: a
    ``components.Proposer`` or ``factory(draft_dir, target, device)`` instead.
    ``engine``: ``hf`` (in-process) or an engine a plugin registers (``--engine vllm``).
    ``aux_ids_convention``: numbering of an *old* export's ``eagle_config`` ids (sglang/vllm).
    ``reasoning``: ``keep`` | ``drop``, as ``dataset.reasoning`` renders the prompts (docs/data.md)."""
    from specforge_core.evaluation.engines import EvalRequest, get_engine
    from specforge_core.target import load_target_config

    if steps < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}), max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) "
                         "must be >= 1")
    t0 = time.perf_counter()
    num_layers = int(load_target_config(target, trust_remote_code)["num_hidden_layers"])
    if aux_layers is None and aux_ids_convention is not None:
        aux_layers = export_aux_layers(draft_dir, num_layers, aux_ids_convention)
    items = resolve_prompts(prompts, target, tokenizer, chat_template, max_seq_length, reasoning)
    if max_prompts is not None:
        items = items[:max_prompts]
    if not items:
        raise ValueError(f"no prompts to evaluate (from {prompts!r})")
    if eos_ids is None:
        eos_ids = eos_token_ids(target, tokenizer)
    if engine != "hf":
        if fast:
            raise ValueError(f"--fast is a shortcut of the hf engine; engine '{engine}' runs the real loop")
        run = get_engine(engine, registry)
        return run(EvalRequest(str(draft_dir), target, items, steps, max_new_tokens, list(eos_ids), check, dtype,
                               list(aux_layers) if aux_layers else None, engine_python, trust_remote_code,
                               progress))

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tm = TargetModel(target, [], device, dtype, trust_remote_code)
    if proposer is None:
        proposer = load_proposer(draft_dir, tm, tm.device, algorithm, registry)
    elif not hasattr(proposer, "propose"):
        proposer = proposer(draft_dir, tm, tm.device)
    if fast and not callable(getattr(proposer, "teacher_forced", None)):
        raise ValueError("--fast needs a proposer with teacher_forced(); this draft algorithm has none")
    tm.aux_layer_ids = resolve_aux_layers(aux_layers or proposer.aux_layers or (), num_layers)

    overall, raw_all = AcceptStats(steps), AcceptStats(steps)
    categories: dict[str, AcceptStats] = {}
    reports: list[PromptReport] = []
    timings = {"speculate_s": 0.0, "greedy_s": 0.0}
    bar = _Progress(len(items), progress)
    for lo in range(0, len(items), batch_size):
        chunk = items[lo: lo + batch_size]
        ids = [p.input_ids.tolist() for p in chunk]
        t1 = time.perf_counter()
        reference = greedy_batch(ids, tm, max_new_tokens, eos_ids) if (fast or check) else None
        t2 = time.perf_counter()
        if fast:
            results = [fast_speculate(x, out, proposer, tm, steps) for x, out in zip(ids, reference, strict=True)]
        else:
            results = speculate_batch(ids, proposer, tm, steps, max_new_tokens, eos_ids)
        timings["greedy_s"] += t2 - t1
        timings["speculate_s"] += time.perf_counter() - t2
        for p, x, res, i in zip(chunk, ids, results, range(len(chunk)), strict=True):
            mismatch = first_difference(res.output, reference[i]) if (check and not fast) else None
            stats = AcceptStats(steps)
            for accepted, committed in res.cycles:
                stats.add_cycle(accepted, committed)
            raw = None if fast else stats_from_cycles(res.matched, steps)
            overall.merge(stats)
            if raw is not None:
                raw_all.merge(raw)
            if p.category:
                categories.setdefault(p.category, AcceptStats(steps)).merge(stats)
            reports.append(PromptReport(p.sample_id, p.category, len(x), len(res.output), stats, mismatch, raw))
        bar.advance(len(chunk))
    bar.close()
    return EvalReport(str(draft_dir), target, steps, max_new_tokens, "fast" if fast else "exact",
                      overall, categories, reports, time.perf_counter() - t0, engine="hf",
                      raw=None if fast else raw_all, extra={"timings": timings, "batch_size": batch_size})


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import Progress

            self.progress = Progress(transient=True)
            self.progress.start()
            self.task = self.progress.add_task("eval", total=total)

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
