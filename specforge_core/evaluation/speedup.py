"""``specforge eval --speedup``: expected tokens/s per concurrency level from measured forward costs.

For each concurrency c (rows decoded together) on this device, with the evaluated setting:

    plain       = c / t_target(c rows x 1 token)                       tokens/s without speculation
    speculative = c * tau / (t_draft(c) + t_target(c rows x N tokens))  N = K + 1 (chain) or tree tokens
    speed-up    = speculative / plain

``t_draft(c)`` is one ``propose`` / ``propose_tree`` of c rows, ``t_target`` one verification forward
over a context of the evaluated prompts' typical length; each is the median of a few timed repeats
after a warm-up. tau is the evaluation's own (truncated) acceptance length.

Where the estimate is not valid: it ignores the engine's scheduling, sampling and rollback
overheads, CUDA graphs and kernels an engine has that transformers has not (it times the HF
target), prefill interleaved with decode, and acceptance changing with batch composition. Against
vLLM on CPU (docs/evaluation.md) the largest miss is the engine's drafter step, about 2x the HF
draft forwards (K forwards, each with the engine's input preparation): within ~20-25% of vLLM's
measured speed-up on SmolLM2-135M, 40-70% too high on a toy target. It is a ranking of settings
on this device, not a promise of an engine's number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from specforge_core.evaluation.batch import TargetBatch
from specforge_core.evaluation.speculate import draft_trees

REPEATS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(settings: Any, proposer, target, prompt: Sequence[int], concurrency: int) -> dict[str, float]:
    """Forward costs (seconds) at ``concurrency`` rows, each row holding ``prompt`` as context."""
    rows = [list(prompt)] * concurrency
    batch = TargetBatch(target)
    logits, feats = batch.prefill(rows)
    first = logits.argmax(-1).tolist()
    proposer.begin(rows)
    proposer.observe([p[1:] + [f] for p, f in zip(rows, first, strict=True)], feats)

    def plain() -> None:
        _, _, width = batch.append([[f] for f in first])
        batch.commit_nodes([[] for _ in first], width)  # nothing kept: the context stays the same

    trees = draft_trees(proposer, settings.steps, settings.tree)

    def verify() -> None:
        _, _, width = batch.append([[f, *t.tokens] for f, t in zip(first, trees, strict=True)],
                                   parents=[t.parents for t in trees])
        batch.commit_nodes([[] for _ in first], width)

    def draft() -> None:
        draft_trees(proposer, settings.steps, settings.tree)

    return {"target_1": _median_time(plain, target.device), "target_verify": _median_time(verify, target.device),
            "draft": _median_time(draft, target.device), "verify_tokens": trees[0].size}


def attach_speedup(report: Any, settings: Any, proposer, target, items: Sequence[Any]) -> None:
    """Measure at every ``settings.concurrency`` level and put the estimate in ``report.extra``."""
    lengths = sorted(len(p.input_ids) for p in items)
    prompt = items[[len(p.input_ids) for p in items].index(lengths[len(lengths) // 2])].input_ids.tolist()
    context = prompt + [prompt[-1]] * (settings.max_new_tokens // 2)  # mid-generation context length
    rows = []
    for c in settings.concurrency:
        m = measure(settings, proposer, target, context, c)
        plain = c / m["target_1"]
        spec = c * report.tau / (m["draft"] + m["target_verify"])
        rows.append({"concurrency": c, **m, "plain_tok_s": plain, "spec_tok_s": spec, "speedup": spec / plain})
    report.extra["speedup"] = {"setting": settings.shape, "tau": report.tau, "device": str(target.device),
                               "context_tokens": len(context), "rows": rows}


def with_engine_overhead(row: dict, tau: float, plain_step_s: float) -> float:
    """The estimate with an engine's measured per-step overhead added to both sides.

    ``plain_step_s`` is the engine's own time per plain decoding step at this concurrency (e.g.
    from ``--engine vllm --speedup``). Whatever it spends beyond the HF forward ``target_1`` --
    scheduling, input preparation, sampling, output processing, or a faster or slower kernel --
    is taken as a fixed cost O paid once per step by both modes:

        speed-up = tau (t_1 + O) / (t_draft + t_verify + O),   O = plain_step_s - t_1

    What it still leaves out (measured in docs/evaluation.md): the drafter's own per-step engine
    costs (K draft forwards each with their metadata) and rejection sampling, which only the
    speculative step pays."""
    overhead = plain_step_s - row["target_1"]
    return tau * plain_step_s / (row["draft"] + row["target_verify"] + overhead)


def speedup_table(data: dict):
    from rich.table import Table

    t = Table(title=f"estimated speed-up on {data['device']}: {data['setting']}, tau {data['tau']:.3f}, "
                    f"context {data['context_tokens']} tokens (HF target timed; see docs/evaluation.md)")
    for col in ("concurrency", "target 1 tok (ms)", "verify (ms)", "draft (ms)", "plain tok/s", "spec tok/s",
                "speed-up"):
        t.add_column(col, justify="right")
    for r in data["rows"]:
        t.add_row(str(r["concurrency"]), f"{r['target_1'] * 1e3:.1f}", f"{r['target_verify'] * 1e3:.1f}",
                  f"{r['draft'] * 1e3:.1f}", f"{r['plain_tok_s']:.1f}", f"{r['spec_tok_s']:.1f}", f"{r['speedup']:.2f}x")
    return t
