"""``evaluate``: acceptance length of an exported draft, in-process (HF target) or in a serving engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from specforge_core.components import capability, has_capability
from specforge_core.evaluation.accounting import AcceptStats, stats_from_cycles
from specforge_core.evaluation.engines import EvalRequest, get_engine
from specforge_core.evaluation.fast import fast_speculate
from specforge_core.evaluation.proposers import load_proposer
from specforge_core.evaluation.report import EvalReport, PromptReport
from specforge_core.evaluation.settings import EvalSettings
from specforge_core.evaluation.speculate import Sampling, greedy_batch, speculate_batch
from specforge_core.evaluation.target import TargetModel, eos_token_ids
from specforge_core.target import resolve_aux_layers


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


def evaluate(draft_dir: str | Path, target: str, prompts: Any, steps: int = 3, max_new_tokens: int = 128, *,
             tokenizer=None, proposer: Any = None, registry: Any = None, **fields: Any) -> EvalReport:
    """Speculation with the exported draft on every prompt; ``fields`` are ``EvalSettings``'s
    (``tree``, ``temperature``, ``fast``, ``check``, ``engine``, ``batch_size``, ...).

    ``prompts``: conversation files (their last assistant turn is dropped), ``Prompt`` objects, or
    token-id lists. ``proposer``: a ``components.Proposer`` or ``factory(draft_dir, target, device)``
    instead of the draft algorithm's."""
    settings = EvalSettings(draft=str(draft_dir), target=target, prompts=prompts, steps=steps,
                            max_new_tokens=max_new_tokens, **fields)
    return run_eval(settings, tokenizer=tokenizer, proposer=proposer, registry=registry)


def run_eval(s: EvalSettings, *, tokenizer=None, proposer: Any = None, registry: Any = None) -> EvalReport:
    """Run one evaluation: chain or tree (``s.tree``), greedy or sampled (``s.temperature``), in
    process (``hf``) or in a plugin's engine. Greedy runs are guarded: speculative output must equal
    plain greedy decoding (``s.check``); sampled runs are not (their output is random by design)."""
    from specforge_core.target import load_target_config

    t0 = time.perf_counter()
    num_layers = int(load_target_config(s.target, s.trust_remote_code)["num_hidden_layers"])
    items = resolve_prompts(s.prompts, s.target, tokenizer, s.chat_template, s.max_seq_length, s.reasoning)
    if s.max_prompts is not None:
        items = items[: s.max_prompts]
    if not items:
        raise ValueError(f"no prompts to evaluate (from {s.prompts!r})")
    eos_ids = list(s.eos_ids) if s.eos_ids is not None else eos_token_ids(s.target, tokenizer)
    check = s.check and not s.sampling
    if s.engine != "hf":
        if s.fast:
            raise ValueError(f"--fast is a shortcut of the hf engine; engine '{s.engine}' runs the real loop")
        run = get_engine(s.engine, registry)
        return run(EvalRequest(s.draft, s.target, items, s.steps, s.max_new_tokens, eos_ids, check, s.dtype,
                               list(s.aux_layers) if s.aux_layers else None, s.engine_python, s.trust_remote_code,
                               s.progress, temperature=s.temperature, seed=s.seed, tree=s.tree, speedup=s.speedup,
                               concurrency=list(s.concurrency)))

    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tm = TargetModel(s.target, [], device, s.dtype, s.trust_remote_code)
    if proposer is None:
        proposer = load_proposer(s.draft, tm, tm.device, s.algorithm, registry)
    elif not hasattr(proposer, "propose"):
        proposer = proposer(s.draft, tm, tm.device)
    if s.fast and not has_capability(proposer, "Proposer.teacher_forced"):
        raise ValueError("--fast needs a proposer with teacher_forced(); this draft algorithm has none")
    tm.aux_layer_ids = resolve_aux_layers(s.aux_layers or proposer.aux_layers or (), num_layers)

    K = s.depth
    sampling = Sampling(s.temperature, s.seed)
    overall, raw_all = AcceptStats(K), AcceptStats(K)
    categories: dict[str, AcceptStats] = {}
    reports: list[PromptReport] = []
    timings = {"speculate_s": 0.0, "greedy_s": 0.0}
    expected_sum, expected_cycles = 0.0, 0
    bar = _Progress(len(items), s.progress)
    for lo in range(0, len(items), s.batch_size):
        chunk = items[lo: lo + s.batch_size]
        ids = [p.input_ids.tolist() for p in chunk]
        t1 = time.perf_counter()
        reference = greedy_batch(ids, tm, s.max_new_tokens, eos_ids) if (s.fast or check) else None
        t2 = time.perf_counter()
        if s.fast:
            results = [fast_speculate(x, out, proposer, tm, K) for x, out in zip(ids, reference, strict=True)]
        else:
            # each chunk its own seed: reruns with the same prompts and batch size draw the same numbers
            results = speculate_batch(ids, proposer, tm, s.steps, s.max_new_tokens, eos_ids, s.tree,
                                      Sampling(sampling.temperature, sampling.seed + lo))
        timings["greedy_s"] += t2 - t1
        timings["speculate_s"] += time.perf_counter() - t2
        for p, x, res, i in zip(chunk, ids, results, range(len(chunk)), strict=True):
            mismatch = first_difference(res.output, reference[i]) if (check and not s.fast) else None
            stats = AcceptStats(K)
            for accepted, committed in res.cycles:
                stats.add_cycle(accepted, committed)
            raw = None if s.fast else stats_from_cycles(res.matched, K)
            overall.merge(stats)
            if raw is not None:
                raw_all.merge(raw)
            if p.category:
                categories.setdefault(p.category, AcceptStats(K)).merge(stats)
            expected = (1.0 + sum(res.expected) / len(res.expected)) if res.expected else None
            expected_sum += sum(res.expected)
            expected_cycles += len(res.expected)
            reports.append(PromptReport(p.sample_id, p.category, len(x), len(res.output), stats, mismatch, raw,
                                        expected))
        bar.advance(len(chunk))
    bar.close()
    extra: dict[str, Any] = {"timings": timings, "batch_size": s.batch_size, "shape": s.shape,
                             "temperature": s.temperature}
    if s.tree is not None:
        extra["tree"] = {"topk": s.tree.topk, "depth": s.tree.depth, "tokens": s.tree.tokens}
    if expected_cycles:
        extra["expected_tau"] = 1.0 + expected_sum / expected_cycles
        extra["seed"] = s.seed
    report = EvalReport(s.draft, s.target, K, s.max_new_tokens, "fast" if s.fast else "exact",
                        overall, categories, reports, time.perf_counter() - t0, engine="hf",
                        raw=None if s.fast else raw_all, extra=extra)
    flags_of = capability(proposer, "Proposer.serving_flags")  # optional: the engines' flags for this setting
    if flags_of is not None:
        report.extra["serving_flags"] = flags_of(s.draft, s.steps, s.tree)
    if s.speedup:
        from specforge_core.evaluation.speedup import attach_speedup

        attach_speedup(report, s, proposer, tm, items)
    return report


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
