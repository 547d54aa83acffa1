"""Teacher-forced fast path for temperature 0 (``--fast``).

Greedy speculation commits exactly the target's greedy output y, so every cycle's drafts can be
computed from the final sequence x = prompt + y at once: one target forward gives all features,
and one teacher-forced pass of the draft (``Proposer.teacher_forced``; EAGLE-3: its K-step
training-time-test unroll) gives, at every position t, the chain the
draft would propose from there. TTT step k at t reads the *true* token x[t+k+1] where the exact
chain reads its own draft d_k; they differ only after a rejected draft, which no longer affects
the accepted prefix. So walking the cycles over these predictions gives the same counts as the
exact loop (tested), with 2 forwards instead of one per cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specforge_core.evaluation.accounting import truncate_cycle
from specforge_core.evaluation.speculate import SpecResult, accepted_prefix
from specforge_core.evaluation.target import TargetModel


def walk_cycles(prompt_len: int, output: Sequence[int], preds: torch.Tensor, steps: int) -> SpecResult:
    """Replay the cycles over a finished greedy ``output`` given ``chain_predictions`` of
    prompt + output. Drafts beyond the end of ``output`` count as rejected (the stop truncates
    that cycle anyway)."""
    P, N = prompt_len, len(output)
    cycles, matched = [], []
    g = 1  # tokens generated so far (the first one by the prefill)
    while g < N:
        t = P + g - 2  # draft entry of the last committed token x[P+g-1]
        drafts = preds[:, t].tolist()
        m = accepted_prefix(drafts, output[g : g + steps])
        accepted, committed = truncate_cycle(m, N - g)
        cycles.append((accepted, committed))
        matched.append(m)
        g += committed
    return SpecResult(list(output), cycles, matched)


def fast_speculate(prompt: Sequence[int], output: Sequence[int], proposer, target: TargetModel,
                   steps: int) -> SpecResult:
    """Cycle counts of greedy speculation, given the target's greedy ``output`` for ``prompt``;
    ``proposer.teacher_forced`` gives every position's drafts in one pass."""
    seq = list(prompt) + list(output)
    _, aux = target.forward(seq)  # one pass, no cache
    ids = torch.tensor(seq, dtype=torch.int64, device=target.device)
    preds = proposer.teacher_forced(ids, aux, steps).cpu()
    return walk_cycles(len(prompt), output, preds, steps)
