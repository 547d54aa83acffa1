"""Split one optimizer step's samples over data-parallel ranks, balanced by token count.

Metadata only: a ``Result`` names a sample's features in the transfer store; tensors never pass
through here.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import NamedTuple


class Result(NamedTuple):
    """A finished inference result (what engines return and the controller pools)."""

    seq: int  # position in the run's sample stream (unique per run, also across epochs)
    index: int  # index of the sample in the dataset
    key: str  # transfer-store key of its features
    num_tokens: int
    nbytes: int  # exact payload bytes the store holds for it


def balance(results: Sequence[Result], num_ranks: int) -> list[list[Result]]:
    """Greedy longest-first: each sample (longest first) goes to the lightest rank that still has
    room; every rank gets ``len(results) // num_ranks`` samples, the first ``len % num_ranks``
    ranks one more (FSDP needs every rank in every micro-step, so no rank may be left empty)."""
    n = len(results)
    if n < num_ranks:
        raise ValueError(f"balance: {n} samples cannot feed {num_ranks} ranks")
    caps = [n // num_ranks + (1 if r < n % num_ranks else 0) for r in range(num_ranks)]
    out: list[list[Result]] = [[] for _ in range(num_ranks)]
    heap = [(0, r) for r in range(num_ranks)]  # (tokens, rank)
    for res in sorted(results, key=lambda x: (-x.num_tokens, x.seq)):
        full = []
        while True:
            tokens, r = heapq.heappop(heap)
            if len(out[r]) < caps[r]:
                break
            full.append((tokens, r))
        out[r].append(res)
        heapq.heappush(heap, (tokens + res.num_tokens, r))
        for item in full:
            heapq.heappush(heap, item)
    for part in out:  # keep stream order inside a rank (deterministic batch layout)
        part.sort(key=lambda x: x.seq)
    return out


def plan_step(results: Sequence[Result], micro_batch_size: int, num_ranks: int) -> tuple[list[list[list[Result]]], list[Result]]:
    """One optimizer step: ``(micro_steps, dropped)``.

    ``micro_steps[m][r]`` is rank ``r``'s micro-batch at micro-step ``m``. Samples are cut into
    micro-steps of ``micro_batch_size * num_ranks`` in stream order, each balanced over ranks. A
    last micro-step with fewer samples than ranks cannot feed every rank: those samples are
    ``dropped`` (the controller counts them as skipped, with the reason).
    """
    ordered = sorted(results, key=lambda x: x.seq)
    per_micro = micro_batch_size * num_ranks
    micro_steps, dropped = [], []
    for start in range(0, len(ordered), per_micro):
        chunk = ordered[start : start + per_micro]
        if len(chunk) < num_ranks:
            dropped.extend(chunk)
            continue
        micro_steps.append(balance(chunk, num_ranks))
    return micro_steps, dropped
