"""The training controller: metadata only (prompt buffer, result pool, one queue per rank).

``ControllerState`` is plain Python (unit-testable, benchmarkable); ``ControllerActor`` is its Ray
actor: async, so a trainer's ``pull`` can wait for work without blocking everyone else's calls.

Flow: the inference manager ``take_prompts`` (backpressure decides how many), engines turn them
into features in the transfer store, the manager ``push_results`` (store keys + token counts +
exact bytes). When every sample of the next optimizer step is in the pool, the step is planned
(``dispatch.plan_step``: micro-steps, token-balanced over ranks) and queued per rank. Trainers
``pull`` their part, fetch and delete the keys, report ``consumed`` (frees pool bytes) and
``trained`` (accounting).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import attrs
import numpy as np

from specforge_core.pipeline.ray.dispatch import (
    EMPTY_RESULTS,
    RankWork,
    Result,
    ResultBatch,
    _i64,
    plan_rows_step,
    plan_step,
)

TAIL_REASON = "last micro-step had fewer samples than trainer ranks"


class Prompt(NamedTuple):
    seq: int  # position in the run's sample stream
    index: int  # dataset index
    num_tokens: int
    step: int  # the optimizer step it belongs to


class PromptBatch(NamedTuple):
    """Prompts as columns (what the controller hands the manager and the manager an engine)."""

    seq: np.ndarray  # int64
    index: np.ndarray  # int64
    num_tokens: np.ndarray  # int64

    @classmethod
    def of(cls, prompts: Sequence[Prompt]) -> PromptBatch:
        if not prompts:
            return EMPTY_PROMPTS
        seq, index, tokens, _ = zip(*prompts, strict=False)
        return cls(_i64(seq), _i64(index), _i64(tokens))

    @property
    def n(self) -> int:  # prompts (len() is the tuple's field count: NamedTuple._make needs it)
        return len(self.seq)

    def wire(self) -> tuple:
        """A plain tuple of numpy arrays to send (see ``ResultBatch.wire``)."""
        return tuple(self)

    @classmethod
    def from_wire(cls, t: tuple) -> PromptBatch:
        return t if isinstance(t, cls) else cls._make(t)

    def slice(self, start: int, stop: int) -> PromptBatch:
        return PromptBatch(self.seq[start:stop], self.index[start:stop], self.num_tokens[start:stop])


EMPTY_PROMPTS = PromptBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


@attrs.define
class Assignment:
    """One rank's share of one optimizer step."""

    step: int  # optimizer step index (0-based, absolute)
    micro: list[list[Result]]  # this rank's micro-batches (empty: nothing to train this step)
    position: dict[str, int]  # data position after this step (saved in checkpoints)
    discard: list[Result] = attrs.field(factory=list)  # keys to delete unused (rank 0 only)


class ControllerState:
    def __init__(
        self,
        prompts: Sequence[Prompt],
        positions: dict[int, dict[str, int]],
        *,
        num_ranks: int,
        micro_batch_size: int,
        max_pool_bytes: int,
        rows: Optional[dict[int, list[list[int]]]] = None,  # token budget: step -> the plan's rows
    ):
        self.rows = rows
        self.buffer: deque[Prompt] = deque(prompts)
        self.num_ranks, self.micro_batch_size = num_ranks, micro_batch_size
        self.max_pool_bytes = max_pool_bytes
        self.positions = positions
        self.need: Counter[int] = Counter(p.step for p in prompts)  # samples still expected per step
        self.steps = sorted(self.need)
        self.next_i = 0  # index into self.steps of the next step to dispatch
        self.inflight: dict[int, Prompt] = {}
        self.inflight_tokens = 0
        self.pool: dict[int, list[Result]] = {}  # step -> finished, undispatched results
        self.held: dict[int, int] = {}  # seq -> bytes in the store (pushed, not yet consumed)
        self.pool_bytes = 0
        self.max_pool_bytes_seen = 0
        self.bytes_per_token = 0.0  # learned from results (features are per-token tensors)
        self.queues: list[deque[Assignment]] = [deque() for _ in range(num_ranks)]
        self.samples_in = len(prompts)
        self.trained_seqs: set[int] = set()
        self.trained_indices: list[int] = []
        self.skipped: Counter[str] = Counter()
        self.skipped_indices: set[int] = set()  # dataset indices of skipped stream samples
        self.metrics: list[dict[str, float]] = []
        self.results_in = 0
        self.max_sample_bytes = 0
        self.dispatched = 0  # samples handed to trainers

    # ---------------------------------------------------------------------------- inference side
    @property
    def next_step(self) -> Optional[int]:
        return self.steps[self.next_i] if self.next_i < len(self.steps) else None

    def take_prompts(self, max_n: int) -> list[Prompt]:
        """Up to ``max_n`` prompts for inference. Backpressure: a prompt is released only if the
        pool's bytes plus the estimated bytes of everything in flight stay within the limit.
        One exception prevents a deadlock: when nothing dispatched is still held (so no trainer
        will free bytes), the next step's prompts go regardless (the step cannot start without them)."""
        out: list[Prompt] = []
        bpt = self.bytes_per_token
        starving = self.pool_bytes == sum(r.nbytes for rs in self.pool.values() for r in rs)
        while self.buffer and len(out) < max_n:
            p = self.buffer[0]
            if not (starving and p.step == self.next_step):
                if bpt == 0.0 and self.inflight:
                    break  # no size estimate yet: one batch at a time until the first result
                projected = self.pool_bytes + (self.inflight_tokens + p.num_tokens) * bpt
                if projected > self.max_pool_bytes:
                    break
            self.buffer.popleft()
            self.inflight[p.seq] = p
            self.inflight_tokens += p.num_tokens
            out.append(p)
        return out

    def _land(self, seq: int) -> Optional[Prompt]:
        p = self.inflight.pop(seq, None)
        if p is not None:
            self.inflight_tokens -= p.num_tokens
        return p

    def return_prompts(self, seqs: Sequence[int]) -> int:
        """In-flight prompts whose engine died go back to the front of the buffer (stream order)."""
        back = [p for p in (self._land(s) for s in _ints(seqs)) if p is not None]
        for p in sorted(back, key=lambda p: p.seq, reverse=True):
            self.buffer.appendleft(p)
        return len(back)

    def push_results(self, results: Sequence[Result] | ResultBatch | tuple) -> None:
        """Finished results: a list of ``Result``, a ``ResultBatch`` or its wire tuple."""
        if isinstance(results, tuple) and len(results) == 5 and isinstance(results[0], np.ndarray):
            results = ResultBatch.from_wire(results).results()
        for r in results:
            p = self._land(r.seq)
            if p is None:
                raise RuntimeError(f"controller: result for sample seq {r.seq} that is not in flight")
            self.pool.setdefault(p.step, []).append(r)
            self.held[r.seq] = r.nbytes
            self.pool_bytes += r.nbytes
            if r.num_tokens:
                self.bytes_per_token = max(self.bytes_per_token, r.nbytes / r.num_tokens)
            self.results_in += 1
            self.max_sample_bytes = max(self.max_sample_bytes, r.nbytes)
        self.max_pool_bytes_seen = max(self.max_pool_bytes_seen, self.pool_bytes)
        self._dispatch()

    def all_cached(self) -> int:
        """Every buffered prompt's features are already on disk (the feature cache: no inference):
        each becomes a result at once, keyed by its dataset index, holding no store bytes (so no
        backpressure). Returns how many."""
        prompts = list(self.buffer)
        self.buffer.clear()
        for p in prompts:
            self.inflight[p.seq] = p
            self.inflight_tokens += p.num_tokens
        self.push_results([Result(p.seq, p.index, str(p.index), p.num_tokens, 0) for p in prompts])
        return len(prompts)

    def skip_prompts(self, seqs: Sequence[int], reason: str) -> None:
        """Prompts inference could not process (e.g. the backend raised): skipped, with reason."""
        for s in _ints(seqs):
            p = self._land(s)
            if p is not None:
                self.need[p.step] -= 1
                self.skipped[reason] += 1
                self.skipped_indices.add(p.index)
        self._dispatch()

    # ----------------------------------------------------------------------------- trainer side
    def _dispatch(self) -> None:
        while (step := self.next_step) is not None and len(self.pool.get(step, ())) >= self.need[step]:
            results = self.pool.pop(step, [])
            if self.rows is not None:
                micro_steps, dropped = plan_rows_step(results, self.rows[step], self.micro_batch_size, self.num_ranks)
            else:
                micro_steps, dropped = plan_step(results, self.micro_batch_size, self.num_ranks)
            if dropped:
                self.skipped[TAIL_REASON] += len(dropped)
                self.skipped_indices.update(r.index for r in dropped)
            for r in range(self.num_ranks):
                self.queues[r].append(Assignment(
                    step=step, micro=[ms[r] for ms in micro_steps], position=self.positions[step],
                    discard=dropped if r == 0 else [],
                ))
            self.dispatched += sum(len(part) for ms in micro_steps for part in ms)
            self.next_i += 1

    @property
    def finished(self) -> bool:
        """Every step dispatched (trainers may still be working on them)."""
        return self.next_step is None

    def pull(self, rank: int, max_n: int) -> Optional[list[Assignment]]:
        """Up to ``max_n`` queued assignments of ``rank``; None once the run has nothing more."""
        q = self.queues[rank]
        if not q and self.finished:
            return None
        return [q.popleft() for _ in range(min(max_n, len(q)))]

    def pull_work(self, rank: int, max_steps: int) -> Optional[RankWork]:
        """Like ``pull``, as columns: up to ``max_steps`` queued steps of ``rank`` in one
        ``RankWork``; None once the run has nothing more."""
        got = self.pull(rank, max_steps)
        if got is None:
            return None
        samples = [r for a in got for mb in a.micro for r in mb]
        discard = [r for a in got for r in a.discard]
        return RankWork(
            steps=np.fromiter((a.step for a in got), np.int64, len(got)),
            positions=[a.position for a in got],
            micro_per_step=np.fromiter((len(a.micro) for a in got), np.int64, len(got)),
            micro_sizes=np.asarray([len(mb) for a in got for mb in a.micro], np.int64),
            samples=ResultBatch.of(samples),
            discard=ResultBatch.of(discard) if discard else EMPTY_RESULTS,
        )

    def consumed(self, seqs: Sequence[int]) -> None:
        """The trainer fetched and deleted these keys: their bytes leave the pool."""
        held = self.held
        freed = 0
        for s in _ints(seqs):
            freed += held.pop(s, 0)
        self.pool_bytes -= freed

    def trained_columns(self, seqs: Sequence[int], indices: Sequence[int]) -> None:
        """``trained`` as two columns (seq array, dataset-index array)."""
        self.trained(zip(_ints(seqs), _ints(indices), strict=True))

    def trained(self, pairs: Sequence[tuple[int, int]] | Any) -> None:
        """(seq, dataset index) of samples that went through an optimizer step."""
        for seq, index in pairs:
            if seq in self.trained_seqs:
                raise RuntimeError(f"controller: sample seq {seq} was trained twice")
            self.trained_seqs.add(seq)
            self.trained_indices.append(index)

    def report(self, metrics: dict[str, float]) -> None:
        # samples between the stages when the step ended (produced, not yet fetched by a trainer):
        # a throughput window must not count a rise or fall of this buffer as pipeline throughput
        metrics["buffered_samples"] = len(self.held)
        self.metrics.append(metrics)

    # ------------------------------------------------------------------------------- reporting
    def summary(self) -> dict[str, Any]:
        return {
            "samples_in": self.samples_in,
            "trained": len(self.trained_seqs),
            "skipped": dict(self.skipped),
            "buffered": len(self.buffer),
            "inflight": len(self.inflight),
            "pooled": sum(len(v) for v in self.pool.values()),
            "pool_bytes": self.pool_bytes,
            "max_pool_bytes_seen": self.max_pool_bytes_seen,
            "max_sample_bytes": self.max_sample_bytes,
            "held_keys": len(self.held),
            "results_in": self.results_in,
            "dispatched": self.dispatched,
            "steps_reported": len(self.metrics),
        }


def _ints(xs: Any) -> list[int]:
    """Python ints from a numpy column or any sequence (dict keys must be ints, not np.int64)."""
    return xs.tolist() if isinstance(xs, np.ndarray) else list(xs)


class ControllerActor:
    """Ray actor around ``ControllerState`` (async: ``pull`` waits without blocking the actor)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.state = ControllerState(*args, **kwargs)
        self._changed: Optional[asyncio.Condition] = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created inside the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._cond():
            self._cond().notify_all()

    async def take_prompts(self, max_n: int) -> list[Prompt]:
        return self.state.take_prompts(max_n)

    async def return_prompts(self, seqs: Sequence[int]) -> int:
        return self.state.return_prompts(seqs)

    async def all_cached(self) -> int:
        n = self.state.all_cached()
        await self._notify()
        return n

    async def push_results(self, results: Sequence[Result]) -> None:
        self.state.push_results(results)
        await self._notify()

    async def skip_prompts(self, seqs: Sequence[int], reason: str) -> None:
        self.state.skip_prompts(seqs, reason)
        await self._notify()

    async def exchange(
        self, results: ResultBatch | Sequence[Result], max_new: int, failed: Sequence[int] = (),
    ) -> tuple[PromptBatch, bool]:
        """The inference manager's one call per loop: return the prompts of ``failed`` (dead)
        engines to the buffer, push finished results, take new prompts. Everything is columns.
        Returns ``(prompts, has_work)``; ``has_work`` is False once every prompt is done."""
        if len(failed):
            self.state.return_prompts(failed)
        if (results.n if isinstance(results, ResultBatch) else
                len(results[0]) if isinstance(results, tuple) and len(results) == 5 else len(results)):
            self.state.push_results(results)
            await self._notify()
        prompts = PromptBatch.of(self.state.take_prompts(max_new)) if max_new else EMPTY_PROMPTS
        return prompts.wire(), bool(self.state.buffer or self.state.inflight)

    async def pull(
        self, rank: int, max_steps: int = 1, timeout_s: float = 1.0, min_steps: int = 1,
        consumed: Sequence[int] = (), trained_seq: Sequence[int] = (), trained_index: Sequence[int] = (),
    ) -> Optional[tuple]:
        """A trainer rank's one call: acknowledge ``consumed`` keys (seq column) and trained
        samples (seq and dataset-index columns), then wait up to ``timeout_s`` for ``min_steps``
        queued steps (fewer once all are dispatched) and take up to ``max_steps`` of them as one
        ``RankWork`` (its wire tuple: ``RankWork.from_wire``). An empty one on timeout, None when
        the run has no more work for this rank."""
        self._ack(consumed, trained_seq, trained_index)
        cond, q = self._cond(), self.state.queues[rank]
        if not (len(q) >= min_steps or self.state.finished):
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: len(q) >= min_steps or self.state.finished),
                                           timeout_s)
                except asyncio.TimeoutError:
                    pass
        work = self.state.pull_work(rank, max_steps)
        return None if work is None else work.wire()

    def _ack(self, consumed: Sequence[int], trained_seq: Sequence[int], trained_index: Sequence[int]) -> None:
        if len(consumed):
            self.state.consumed(consumed)
        if len(trained_seq):
            self.state.trained_columns(trained_seq, trained_index)

    async def ack(
        self, consumed: Sequence[int] = (), trained_seq: Sequence[int] = (), trained_index: Sequence[int] = (),
    ) -> None:
        """Acknowledgements without a pull (a trainer's last ones)."""
        self._ack(consumed, trained_seq, trained_index)

    async def consumed(self, seqs: Sequence[int]) -> None:
        self.state.consumed(seqs)

    async def trained(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.state.trained(pairs)

    async def report(self, metrics: dict[str, float]) -> None:
        self.state.report(metrics)

    async def metrics_since(self, start: int) -> list[dict[str, float]]:
        return self.state.metrics[start:]

    async def summary(self) -> dict[str, Any]:
        return self.state.summary()

    async def trained_indices(self) -> list[int]:
        return list(self.state.trained_indices)

    async def skipped_indices(self) -> list[int]:
        return sorted(self.state.skipped_indices)

    async def has_work(self) -> bool:
        """Prompts left for inference (buffered or in flight)."""
        return bool(self.state.buffer or self.state.inflight)
