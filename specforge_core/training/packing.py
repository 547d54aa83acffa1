"""Pack a micro-batch's samples into rows of one fixed length (``training.packing``).

Chat data is short and skewed, so padding every sample to the longest of its micro-batch wastes
much of each step, and every new longest length is a new shape for compiled kernels. Packing puts
several samples (documents) end to end into rows of exactly ``row_tokens`` positions: the shape is
the same every step and padding is left only at the end of a row.

A packed ``Batch`` carries ``doc_ids`` (int32 [B, T]: the document index of each position inside
its row, -1 on padding) and ``position_ids`` (int64 [B, T]: the position inside its document, for
rope). Algorithms that accept packed batches must keep attention and targets inside documents
(llama-eagle3 does: document-masked attention, no target across a boundary); ``lengths`` holds
each row's used positions, so ``num_tokens`` stays the count of real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specforge_core.training.batch import Batch, _on, collate
from specforge_core.types import TargetFeatures


def assign_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's total <= ``row_tokens``; samples
    keep their input order inside a row (only the row choice follows the sorted order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > row_tokens:
            raise ValueError(f"packing: a sample of {n} tokens does not fit a row of {row_tokens} "
                             f"(training.pack_tokens must be >= dataset.max_seq_length)")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_tokens - n)
    return [sorted(r) for r in rows]


def fill_rows(lengths: Sequence[int], row_tokens: int, n_rows: int,
              age: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """Token-budget packing: exactly ``n_rows`` rows of ``row_tokens`` positions filled first-fit
    from a buffer of candidate samples, oldest first (``age``: steps a sample has waited), then
    longest first; the samples that do not fit are returned (input order) to wait for the next
    step. Fed from a stream with more candidates than room, every step has the same shape and
    almost no padding; documents are never split (a row breaks only between documents). A sample
    waits at most until it is among the oldest, which are placed first into empty rows."""
    age = age if age is not None else [0] * len(lengths)
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    room = [row_tokens] * n_rows
    left: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-age[i], -lengths[i])):
        n = lengths[i]
        if n > row_tokens:
            raise ValueError(f"packing: a sample of {n} tokens does not fit a row of {row_tokens} "
                             f"(training.pack_tokens must be >= dataset.max_seq_length)")
        r = next((r for r in range(n_rows) if n <= room[r]), None)
        if r is None:
            left.append(i)
            continue
        rows[r].append(i)
        room[r] -= n
    return [sorted(r) for r in rows], sorted(left)


def budget_schedule(lengths: Sequence[int], order: Sequence[int], row_tokens: int,
                    n_rows: int) -> list[list[list[int]]]:
    """One epoch of token-budget steps (``training.token_budget``): the samples of ``order`` (indices
    into ``lengths``) streamed through ``fill_rows`` with a look-ahead of one row. Each step is
    ``n_rows`` rows of sample indices; every sample of ``order`` is in exactly one step, whole;
    only the epoch's last steps may have empty rows. Deterministic in its inputs, so a resumed run
    recomputes the same schedule and continues at its step number (nothing carried to save)."""
    steps: list[list[list[int]]] = []
    pending: list[int] = []
    age: list[int] = []
    pos, capacity = 0, row_tokens * n_rows
    while pos < len(order) or pending:
        have = sum(lengths[i] for i in pending)
        new: list[int] = []
        while pos < len(order) and have < capacity + row_tokens:
            new.append(order[pos])
            have += lengths[order[pos]]
            pos += 1
        cand, cand_age = pending + new, age + [0] * len(new)
        rows, left = fill_rows([lengths[i] for i in cand], row_tokens, n_rows, cand_age)
        steps.append([[cand[j] for j in r] for r in rows])
        pending, age = [cand[j] for j in left], [cand_age[j] + 1 for j in left]
    return steps


class TokenBudgetPacker:
    """Carries the samples that did not fit one step over to the next (``fill_rows``): every step
    is ``n_micro`` micro-batches of ``rows_per_micro`` rows x ``row_tokens`` positions."""

    def __init__(self, row_tokens: int, rows_per_micro: int, n_micro: int):
        self.row_tokens, self.rows_per_micro, self.n_micro = row_tokens, rows_per_micro, n_micro
        self.pending: list[TargetFeatures] = []
        self.age: list[int] = []

    @property
    def capacity(self) -> int:
        return self.row_tokens * self.rows_per_micro * self.n_micro

    def pending_tokens(self) -> int:
        return sum(f.num_tokens for f in self.pending)

    def step(self, new: Sequence[TargetFeatures], device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> list[Batch]:
        """The step's micro-batches from the carried samples plus ``new``."""
        feats, age = self.pending + list(new), self.age + [0] * len(new)
        rows, left = fill_rows([f.num_tokens for f in feats], self.row_tokens,
                               self.rows_per_micro * self.n_micro, age)
        self.pending, self.age = [feats[i] for i in left], [age[i] + 1 for i in left]
        g = self.rows_per_micro
        return [_packed(feats, rows[j : j + g], self.row_tokens, torch.device(device), dtype)
                for j in range(0, len(rows), g)]


def assemble(
    features: Sequence[TargetFeatures],
    device: torch.device | str,
    dtype: torch.dtype,
    pack_tokens: int = 0,
    rows: int = 0,
) -> Batch:
    """The trainer's micro-batch from samples: packed rows of ``pack_tokens`` positions when it is
    set (exactly ``rows`` rows when given and the samples fit them: one shape), else right-padded
    to the longest sample, rounded up to 128 on CUDA (flex attention's block size: few distinct
    shapes for the compiled kernels)."""
    if pack_tokens:
        return pack(features, pack_tokens, device, dtype, rows=rows)
    return collate(features, device, dtype, pad_multiple=128 if torch.device(device).type == "cuda" else 1)


def pack_step(
    features: Sequence[TargetFeatures],
    row_tokens: int,
    rows_per_micro: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tight: bool = False,
) -> list[Batch]:
    """A whole optimizer step's samples packed into rows, grouped into micro-batches of exactly
    ``rows_per_micro`` rows (the last one topped up with empty rows): every micro-batch has the same
    shape, and far fewer padding positions than ``rows_per_micro`` samples padded to their longest.
    The step's objective is token-weighted over the whole step, so regrouping its samples does not
    change it (tests/test_training_normalisation.py)."""
    lengths = [f.num_tokens for f in features]
    rows = assign_rows(lengths, row_tokens)
    if not tight:
        groups = [rows[i : i + rows_per_micro] for i in range(0, len(rows), rows_per_micro)]
        groups[-1] = groups[-1] + [[] for _ in range(rows_per_micro - len(groups[-1]))]
        return [_packed(features, g, row_tokens, torch.device(device), dtype) for g in groups]
    # tight: fullest rows together, each micro-batch only as long as its fullest row (rounded up
    # to 128) and no empty rows: less padding, a few more shapes for the compiled kernels
    rows.sort(key=lambda r: -sum(lengths[i] for i in r))
    groups = [rows[i : i + rows_per_micro] for i in range(0, len(rows), rows_per_micro)]
    out = []
    for g in groups:
        used = max(sum(lengths[i] for i in r) for r in g)
        out.append(_packed(features, g, min(row_tokens, used + (-used % 128)), torch.device(device), dtype))
    return out


def pack(
    features: Sequence[TargetFeatures],
    row_tokens: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rows: int = 0,
) -> Batch:
    """Packed ``Batch`` [rows, row_tokens] of ``features`` (see the module doc): as few rows as
    first-fit decreasing needs, or exactly ``rows`` (empty ones all padding) when the samples fit
    them (a token-budget micro-batch on a Ray rank: the plan's shape every micro-step)."""
    if not features:
        raise ValueError("pack: empty micro-batch")
    lengths = [f.num_tokens for f in features]
    assignment = None
    if rows:
        assignment, left = fill_rows(lengths, row_tokens, rows)
        assignment = None if left else assignment
    if assignment is None:
        assignment = assign_rows(lengths, row_tokens)
    return _packed(features, assignment, row_tokens, torch.device(device), dtype)


def pack_rows(features: Sequence[TargetFeatures], rows: list[list[int]], row_tokens: int,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Batch:
    """Packed ``Batch`` [len(rows), row_tokens] with the given row assignment (indices into
    ``features`` per row, e.g. one micro-batch of a ``budget_schedule`` step)."""
    return _packed(features, rows, row_tokens, torch.device(device), dtype)


def _packed(features: Sequence[TargetFeatures], rows: list[list[int]], row_tokens: int, device: torch.device,
            dtype: torch.dtype) -> Batch:
    """The ``Batch`` of ``rows`` (sample indices per row; an empty row is all padding)."""
    lengths = [f.num_tokens for f in features]
    B, T = len(rows), row_tokens
    aux_dim, hid_dim = features[0].aux_hidden.shape[-1], features[0].final_hidden.shape[-1]
    input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    loss_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    target_argmax = torch.zeros(B, T, dtype=torch.long, device=device)
    aux = torch.zeros(B, T, aux_dim, dtype=dtype, device=device)
    final = torch.zeros(B, T, hid_dim, dtype=dtype, device=device)
    doc_ids = torch.full((B, T), -1, dtype=torch.int32, device=device)
    position_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    used = []
    for r, members in enumerate(rows):
        start = 0
        for d, i in enumerate(members):
            f, n = features[i], lengths[i]
            span = slice(start, start + n)
            input_ids[r, span] = _on(f.input_ids, device)
            loss_mask[r, span] = _on(f.loss_mask, device)
            target_argmax[r, span] = _on(f.target_argmax, device)
            aux[r, span] = _on(f.aux_hidden, device)
            final[r, span] = _on(f.final_hidden, device)
            doc_ids[r, span] = d
            position_ids[r, span] = torch.arange(n, device=device)
            start += n
        used.append(start)
    lengths_t = torch.tensor(used, dtype=torch.long).to(device, non_blocking=True)
    return Batch(
        input_ids=input_ids, loss_mask=loss_mask, attention_mask=doc_ids >= 0, aux_hidden=aux,
        final_hidden=final, target_argmax=target_argmax, lengths=lengths_t, doc_ids=doc_ids,
        position_ids=position_ids,
    )
