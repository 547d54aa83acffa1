"""Split one optimizer step's samples over data-parallel ranks, balanced by token count.

Metadata only: a ``Result`` names a sample's features in the transfer store; tensors never pass
through here.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np


class Result(NamedTuple):
    """A finished inference result (what engines return and the controller pools)."""

    seq: int  # position in the run's sample stream (unique per run, also across epochs)
    index: int  # index of the sample in the dataset
    key: str  # transfer-store key of its features
    num_tokens: int
    nbytes: int  # exact payload bytes the store holds for it


class ResultBatch(NamedTuple):
    """Many ``Result`` s as columns: what engines return and the manager pushes (wire format).

    Pickling five flat columns costs a few bytes per sample; a list of ``Result`` tuples costs a
    Python object per sample on both ends of every hop."""

    seq: np.ndarray  # int64
    index: np.ndarray  # int64
    keys: list[str]
    num_tokens: np.ndarray  # int64
    nbytes: np.ndarray  # int64

    @classmethod
    def of(cls, results: Sequence[Result]) -> ResultBatch:
        if not results:
            return EMPTY_RESULTS
        seq, index, keys, tokens, nbytes = zip(*results, strict=False)
        return cls(_i64(seq), _i64(index), list(keys), _i64(tokens), _i64(nbytes))

    @classmethod
    def concat(cls, batches: Sequence[ResultBatch]) -> ResultBatch:
        batches = [b for b in batches if b.n]
        if len(batches) <= 1:
            return batches[0] if batches else EMPTY_RESULTS
        return cls(*(np.concatenate([b[i] for b in batches]) for i in (0, 1)),
                   [k for b in batches for k in b.keys],
                   *(np.concatenate([b[i] for b in batches]) for i in (3, 4)))

    @property
    def n(self) -> int:  # samples (len() is the tuple's field count: NamedTuple._make needs it)
        return len(self.keys)

    def wire(self) -> tuple:
        """A plain tuple (numpy arrays + a list of str) to send: unpickling it needs only numpy,
        not this package (whose import pulls in torch: seconds and ~200 MB per light actor)."""
        return tuple(self)

    @classmethod
    def from_wire(cls, t: tuple) -> ResultBatch:
        return t if isinstance(t, cls) else cls._make(t)

    def results(self) -> list[Result]:
        return list(map(Result, self.seq.tolist(), self.index.tolist(), self.keys,
                        self.num_tokens.tolist(), self.nbytes.tolist()))


def _i64(xs: Sequence[int]) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


EMPTY_RESULTS = ResultBatch(_i64([]), _i64([]), [], _i64([]), _i64([]))


class RankWork(NamedTuple):
    """One rank's share of one or more consecutive optimizer steps, as columns (what ``pull``
    returns). ``assignments()`` rebuilds the per-step view the trainer iterates."""

    steps: np.ndarray  # int64, one per step
    positions: list[dict[str, int]]  # data position after each step
    micro_per_step: np.ndarray  # int64, number of this rank's micro-batches in each step
    micro_sizes: np.ndarray  # int64, samples in each micro-batch (all steps, in order)
    samples: ResultBatch  # every micro-batch's samples, concatenated in order
    discard: ResultBatch  # keys to delete unused (rank 0 only)

    @property
    def n(self) -> int:  # steps
        return len(self.steps)

    def wire(self) -> tuple:
        """Plain nested tuples to send (see ``ResultBatch.wire``)."""
        return (*self[:4], tuple(self.samples), tuple(self.discard))

    @classmethod
    def from_wire(cls, t: tuple) -> RankWork:
        if isinstance(t, cls):
            return t
        return cls(*t[:4], ResultBatch.from_wire(t[4]), ResultBatch.from_wire(t[5]))

    def assignments(self) -> Iterator[tuple[int, list[list[Result]], dict[str, int]]]:
        """``(step, micro_batches, position)`` per step, in order."""
        res = self.samples.results()
        sizes = self.micro_sizes.tolist()
        at = m = 0
        for step, n_micro, pos in zip(self.steps.tolist(), self.micro_per_step.tolist(), self.positions, strict=False):
            micro = []
            for size in sizes[m : m + n_micro]:
                micro.append(res[at : at + size])
                at += size
            m += n_micro
            yield step, micro, pos


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


def plan_rows_step(results: Sequence[Result], rows: Sequence[Sequence[int]], micro_batch_size: int,
                   num_ranks: int) -> tuple[list[list[list[Result]]], list[Result]]:
    """One token-budget step (``training.token_budget``): ``(micro_steps, dropped)`` from the
    plan's rows (dataset indices per row, ``micro_batch_size * gradient_accumulation * num_ranks``
    of them). Micro-step m gives rank r the rows ``(m * num_ranks + r) * micro_batch_size`` onward,
    so each rank packs exactly its planned rows. Samples inference skipped are simply absent.
    A micro-step where some rank would get nothing (an epoch's tail) is re-balanced by tokens
    over all ranks (``balance``), or dropped if it has fewer samples than ranks; one where every
    rank gets nothing is left out."""
    by_index = {r.index: r for r in results}
    per_micro = micro_batch_size * num_ranks
    micro_steps: list[list[list[Result]]] = []
    dropped: list[Result] = []
    for start in range(0, len(rows), per_micro):
        parts = []
        for r in range(num_ranks):
            group = rows[start + r * micro_batch_size : start + (r + 1) * micro_batch_size]
            parts.append([by_index[i] for row in group for i in row if i in by_index])
        if all(parts):
            micro_steps.append(parts)
            continue
        chunk = [x for part in parts for x in part]
        if len(chunk) >= num_ranks:
            micro_steps.append(balance(chunk, num_ranks))
        else:
            dropped.extend(chunk)
    return micro_steps, dropped
