"""The controller's batched (columnar) metadata API gives the same dispatch as the per-object one.

No Ray and no timing: ``ControllerActor``'s async methods are driven by asyncio in this process,
with messages passed through pickle as their wire tuples (what Ray would send).
"""

from __future__ import annotations

import asyncio
import pickle

import numpy as np

from specforge_core.pipeline.ray.controller import ControllerActor, ControllerState, Prompt, PromptBatch
from specforge_core.pipeline.ray.dispatch import RankWork, Result, ResultBatch


def make_prompts(steps: int, per_step: int) -> tuple[list[Prompt], dict[int, dict[str, int]]]:
    prompts = [Prompt(s * per_step + j, 1000 + s * per_step + j, 5 + (j * 7) % 13, s)
               for s in range(steps) for j in range(per_step)]
    return prompts, {s: {"epoch": 0, "index": (s + 1) * per_step} for s in range(steps)}


def wire(x):  # what crosses a Ray hop: plain tuples, numpy arrays, lists, dicts
    return pickle.loads(pickle.dumps(x))


def test_wire_round_trip_and_plain_types():
    rs = [Result(3, 30, "k3", 7, 70), Result(1, 10, "k1", 5, 50)]
    rb = ResultBatch.of(rs)
    w = rb.wire()
    assert type(w) is tuple and isinstance(w[0], np.ndarray)
    # unpickling the wire format names no specforge class (light actors need not import it)
    assert b"specforge" not in pickle.dumps(w)
    assert ResultBatch.from_wire(wire(w)).results() == rs
    assert ResultBatch.concat([rb, ResultBatch.of([]), rb]).results() == rs + rs
    pb = PromptBatch.of([Prompt(4, 40, 9, 0), Prompt(5, 50, 8, 0)])
    assert PromptBatch.from_wire(wire(pb.wire())).slice(1, 2).seq.tolist() == [5]


def test_batched_actor_api_matches_object_api():
    """Same prompts, two controllers: one driven per object (``ControllerState``), one through the
    actor's batched calls (``exchange`` / ``pull`` with column acks). Same assignments per rank,
    every sample trained once, pool bytes back to zero."""
    ranks, per_step, steps = 4, 8, 6  # micro_batch_size 2 x 4 ranks
    prompts, positions = make_prompts(steps, per_step)
    kw = dict(num_ranks=ranks, micro_batch_size=2, max_pool_bytes=1 << 30)

    ref = ControllerState(prompts, positions, **kw)
    while got := ref.take_prompts(10_000):
        ref.push_results([Result(p.seq, p.index, f"k{p.seq}", p.num_tokens, 3 * p.num_tokens) for p in got])
    expected = {r: [(a.step, [[x.seq for x in mb] for mb in a.micro], a.position) for a in ref.pull(r, 100)]
                for r in range(ranks)}

    actor = ControllerActor(prompts, positions, **kw)

    async def drive() -> dict[int, list]:
        out: dict[int, list] = {r: [] for r in range(ranks)}
        results = ResultBatch.of([]).wire()
        while True:  # manager: push what finished, take 5 prompts at a time
            pw, has_work = await actor.exchange(wire(results), 5)
            pb = PromptBatch.from_wire(wire(pw))
            if pb.n == 0 and not has_work:
                break
            results = ResultBatch(pb.seq, pb.index, [f"k{s}" for s in pb.seq.tolist()], pb.num_tokens,
                                  3 * pb.num_tokens).wire()
        for r in range(ranks):  # trainers: two steps per pull, acks of the last pull on the next
            acks = (np.zeros(0, np.int64),) * 3
            while (w := await actor.pull(r, 2, 0.01, 1, *map(wire, acks))) is not None:
                work = RankWork.from_wire(wire(w))
                out[r].extend((s, [[x.seq for x in mb] for mb in micro], pos) for s, micro, pos in work.assignments())
                acks = (work.samples.seq, work.samples.seq, work.samples.index)  # sent with the next pull
        return out

    assert asyncio.run(drive()) == expected
    s = actor.state.summary()
    assert s["trained"] == s["samples_in"] == len(prompts) and s["pool_bytes"] == 0 and s["held_keys"] == 0
    assert sorted(actor.state.trained_indices) == sorted(p.index for p in prompts)


def test_failed_prompts_return_through_exchange():
    prompts, positions = make_prompts(2, 4)
    actor = ControllerActor(prompts, positions, num_ranks=2, micro_batch_size=2, max_pool_bytes=1 << 30)

    async def drive() -> tuple[list[int], list[int]]:
        first, _ = await actor.exchange(ResultBatch.of([]).wire(), 3)
        seqs = PromptBatch.from_wire(first).seq
        again, _ = await actor.exchange(ResultBatch.of([]).wire(), 3, failed=wire(seqs))  # engine died
        return seqs.tolist(), PromptBatch.from_wire(again).seq.tolist()

    died, retaken = asyncio.run(drive())
    assert retaken == died == [0, 1, 2]  # back at the front of the buffer, in stream order
    assert actor.state.summary()["inflight"] == 3
