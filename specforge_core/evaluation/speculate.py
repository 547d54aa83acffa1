"""Exact greedy speculation (SGLang topk=1, num_draft_tokens=K+1), batched over prompts.

Two roles, so other drafters and trees can slot in (see docs/evaluation.md):

* the **proposer** (``components.Proposer``, given by the draft algorithm) owns the draft and its
  state: ``observe`` feeds it newly committed tokens with their target features, ``propose``
  returns K draft tokens per row;
* the **verifier** (here: the HF target through ``TargetBatch``) runs each row's last committed
  token plus its drafts in one batched forward, accepts the longest matching prefix plus the
  target's bonus token, and turns the rejected entries into holes of its KV cache.

Indexing: row r has committed x[0..n]; the target has run x[0..n-1] (features f[0..n-1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from specforge_core.evaluation.accounting import truncate_cycle
from specforge_core.evaluation.batch import TargetBatch
from specforge_core.evaluation.target import TargetModel


@attrs.define
class SpecResult:
    output: list[int]  # generated tokens (first one from the prefill)
    cycles: list[tuple[int, int]]  # (accepted, committed) per verification forward
    matched: list[int]  # untruncated accepted count per cycle (what engines count)


def accepted_prefix(drafts: Sequence[int], target_tokens: Sequence[int]) -> int:
    """Number of leading drafts equal to the target's tokens at the same positions."""
    m = 0
    while m < len(drafts) and m < len(target_tokens) and drafts[m] == target_tokens[m]:
        m += 1
    return m


def stop_budget(tokens: Sequence[int], remaining: int, eos: set[int]) -> int:
    """Tokens of ``tokens`` committed before the stop: EOS (kept) or the ``remaining`` budget."""
    for i, t in enumerate(tokens):
        if t in eos:
            return min(remaining, i + 1)
    return remaining


def speculate_batch(prompts: Sequence[Sequence[int]], proposer, target: TargetModel, steps: int,
                    max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[SpecResult]:
    """Greedy speculation for a batch of prompts: one prefill, then per cycle draft K / verify all
    rows in one forward / roll back, until each row hits EOS or ``max_new_tokens``."""
    prompts = [list(p) for p in prompts]
    eos = set(eos_ids)
    batch = TargetBatch(target)
    firsts, feats = batch.prefill(prompts)
    proposer.begin(prompts)
    proposer.observe([p[1:] + [f] for p, f in zip(prompts, firsts, strict=True)], feats)
    results = [SpecResult([f], [], []) for f in firsts]
    active = [r for r, res in enumerate(results) if not _done(res, max_new_tokens, eos)]
    _select(batch, proposer, active, len(results))
    while active:
        drafts = proposer.propose(steps)
        nxt, aux, width = batch.append([[results[r].output[-1], *d] for r, d in zip(active, drafts, strict=True)])
        nxt = nxt.tolist()
        keep, tokens, features = [], [], []
        for b, r in enumerate(active):
            res = results[r]
            m = accepted_prefix(drafts[b], nxt[b][:steps])
            new = nxt[b][: m + 1]  # accepted drafts (== target tokens) + the bonus
            accepted, committed = truncate_cycle(m, stop_budget(new, max_new_tokens - len(res.output), eos))
            res.cycles.append((accepted, committed))
            res.matched.append(m)
            res.output.extend(new[:committed])
            keep.append(m + 1)  # target entries of the inputs that were accepted
            tokens.append(new[:committed])
            features.append(aux[b, :committed])
        batch.commit(keep, width)
        proposer.observe(tokens, features)
        still = [b for b, r in enumerate(active) if not _done(results[r], max_new_tokens, eos)]
        if len(still) < len(active):
            batch.keep(still)
            if still:
                proposer.keep(still)
            active = [active[b] for b in still]
    return results


def greedy_batch(prompts: Sequence[Sequence[int]], target: TargetModel, max_new_tokens: int,
                 eos_ids: Sequence[int] = ()) -> list[list[int]]:
    """Plain greedy decoding, one token per row per forward: the reference speculation must equal."""
    eos = set(eos_ids)
    batch = TargetBatch(target)
    firsts, _ = batch.prefill([list(p) for p in prompts])
    outs = [[f] for f in firsts]
    active = [r for r, o in enumerate(outs) if len(o) < max_new_tokens and o[-1] not in eos]
    batch.keep(active)
    while active:
        nxt, _, width = batch.append([[outs[r][-1]] for r in active])
        batch.commit([1] * len(active), width)
        for b, r in enumerate(active):
            outs[r].append(int(nxt[b, 0]))
        still = [b for b, r in enumerate(active) if len(outs[r]) < max_new_tokens and outs[r][-1] not in eos]
        if len(still) < len(active):
            batch.keep(still)
            active = [active[b] for b in still]
    return outs


def _done(res: SpecResult, max_new_tokens: int, eos: set[int]) -> bool:
    return len(res.output) >= max_new_tokens or res.output[-1] in eos


def _select(batch: TargetBatch, proposer, active: list[int], rows: int) -> None:
    if len(active) < rows:
        batch.keep(active)
        if active:
            proposer.keep(active)
