"""The Ray pipeline's metadata path without Ray: token-balanced dispatch and the controller's
backpressure and accounting (pure Python; the Ray tests run the same code inside actors)."""

from __future__ import annotations

import random

import pytest

from specforge_core.pipeline.ray.controller import TAIL_REASON, ControllerState, Prompt
from specforge_core.pipeline.ray.dispatch import Result, balance, plan_step


def results(tokens: list[int]) -> list[Result]:
    return [Result(i, i, f"k{i}", t, 10 * t) for i, t in enumerate(tokens)]


def loads(parts: list[list[Result]]) -> list[int]:
    return [sum(r.num_tokens for r in p) for p in parts]


def test_balance_beats_stream_order_and_is_near_optimal():
    rng = random.Random(0)
    for _trial in range(50):
        ranks = rng.choice([2, 3, 4, 8])
        per = rng.randint(1, 4)
        tok = [rng.choice([rng.randint(8, 64), rng.randint(500, 2000)]) for _ in range(ranks * per)]
        parts = balance(results(tok), ranks)
        # every sample exactly once, every rank the same count (FSDP needs all ranks each micro-step)
        assert sorted(r.seq for p in parts for r in p) == list(range(len(tok)))
        assert [len(p) for p in parts] == [per] * ranks
        naive = [tok[r * per : (r + 1) * per] for r in range(ranks)]  # contiguous chunks, as in order
        assert max(loads(parts)) <= max(sum(c) for c in naive)
        # spread bounded by the longest sample (greedy LPT guarantee with equal counts relaxed to one sample)
        assert max(loads(parts)) - min(loads(parts)) <= max(tok)


def test_balance_known_case():
    parts = balance(results([100, 90, 10, 5]), 2)
    assert sorted(loads(parts)) == [100, 105]  # 100+5 | 90+10, not 100+90 | 10+5
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        balance(results([1, 2, 3]), 4)


def test_plan_step_drops_a_tail_smaller_than_the_rank_count():
    micro, dropped = plan_step(results([5, 6, 7, 8, 9]), micro_batch_size=2, num_ranks=2)
    assert len(micro) == 1 and [len(p) for p in micro[0]] == [2, 2]
    assert [r.seq for r in dropped] == [4]
    micro, dropped = plan_step(results([5, 6, 7, 8, 9, 3]), micro_batch_size=2, num_ranks=2)
    assert len(micro) == 2 and [len(p) for p in micro[1]] == [1, 1] and not dropped


def make_state(n_steps: int, per_step: int, limit: int, ranks: int = 1) -> ControllerState:
    prompts = [Prompt(s * per_step + j, s * per_step + j, 10, s) for s in range(n_steps) for j in range(per_step)]
    positions = {s: {"epoch": 0, "index": (s + 1) * per_step} for s in range(n_steps)}
    return ControllerState(prompts, positions, num_ranks=ranks, micro_batch_size=per_step // ranks,
                           max_pool_bytes=limit)


def finish(state: ControllerState, prompts: list[Prompt]) -> None:
    state.push_results([Result(p.seq, p.index, f"k{p.seq}", p.num_tokens, 100 * p.num_tokens) for p in prompts])


def test_backpressure_pauses_and_resumes_as_trainers_consume():
    # samples of 1000 bytes (10 tokens x 100 bytes), limit 3500 bytes, one sample per step
    state = make_state(n_steps=10, per_step=1, limit=3500)
    first = state.take_prompts(8)
    assert len(first) == 1  # no size estimate yet: one batch until the first result
    finish(state, first)
    got = state.take_prompts(8)
    assert len(got) == 2  # 1000 in the pool + 2 x 1000 in flight <= 3500; a third would exceed
    finish(state, got)
    assert state.take_prompts(8) == []  # 3000 held: paused
    (a,) = state.pull(0, 1)
    state.consumed([r.seq for mb in a.micro for r in mb])  # a trainer fetched + deleted one
    assert len(state.take_prompts(8)) == 1  # resumed, for one more sample
    assert state.max_pool_bytes_seen <= 3500


def test_prompts_of_the_next_step_pass_backpressure():
    """A limit below one step's bytes must not deadlock: the next step's prompts always go."""
    state = make_state(n_steps=2, per_step=4, limit=1500, ranks=2)
    finish(state, state.take_prompts(1))
    got = state.take_prompts(8)
    assert [p.step for p in got] == [0, 0, 0]  # the rest of step 0 despite the limit, not step 1
    finish(state, got)
    assert [len(a.micro[0]) for a in state.pull(0, 5)] == [2]  # 4 samples over 2 ranks x 2


def test_accounting_returned_prompts_skips_and_no_double_training():
    state = make_state(n_steps=3, per_step=2, limit=10**9, ranks=2)
    batch = state.take_prompts(3)  # step 0's two prompts; step 1's wait for a size estimate
    assert state.return_prompts([p.seq for p in batch]) == 2  # engine died: back to the buffer
    assert [p.seq for p in state.take_prompts(10)] == [0, 1]  # stream order kept
    finish(state, [Prompt(s, s, 10, 0) for s in range(2)])
    assert [p.seq for p in state.take_prompts(10)] == [2, 3, 4, 5]
    state.skip_prompts([5], "inference error (ValueError)")
    finish(state, [Prompt(s, s, 10, s // 2) for s in range(2, 5)])
    trained = []
    for rank in (0, 1):
        for a in state.pull(rank, 10):
            trained += [(r.seq, r.index) for mb in a.micro for r in mb]
            assert (rank == 0) == bool(a.discard) or a.step != 2
    state.trained(trained)
    s = state.summary()
    assert s["trained"] == 4 and s["skipped"] == {"inference error (ValueError)": 1, TAIL_REASON: 1}
    assert s["samples_in"] == s["trained"] + sum(s["skipped"].values())
    assert state.pull(0, 1) is None  # finished
    with pytest.raises(RuntimeError, match="trained twice"):
        state.trained(trained[:1])


def test_trainer_waits_on_a_dead_prefetch_thread_with_an_error_not_a_hang():
    import queue
    import threading

    from specforge_core.pipeline.ray.trainer_actor import ControllerFeed

    feed = ControllerFeed(0, controller=None, store=None, stager=None, prefetch_steps=2)
    ready: queue.Queue = feed.ready
    dead = threading.Thread(target=lambda: None)  # ends without putting anything (e.g. it crashed)
    dead.start()
    dead.join()
    feed.thread = dead
    with pytest.raises(RuntimeError, match="prefetch thread ended without a result"):
        feed._next()
    ready.put("last")  # an item put just before the thread ended is still returned
    assert feed._next() == "last"


def test_plan_rows_step_gives_each_rank_its_planned_rows():
    from specforge_core.pipeline.ray.dispatch import plan_rows_step

    # dataset index i has 10 + i tokens; seq = stream position
    res = [Result(seq, i, f"k{i}", 10 + i, 1) for seq, i in enumerate([7, 3, 5, 0, 2, 6, 4])]
    # 2 micro-steps x 2 ranks x 1 row: micro-step 0 = rows 0 (rank 0), 1 (rank 1); micro-step 1 = rows 2, 3
    rows = [[3, 7], [5], [0, 2, 6], [4]]
    micro, dropped = plan_rows_step(res, rows, micro_batch_size=1, num_ranks=2)
    assert [[[r.index for r in part] for part in ms] for ms in micro] == [[[3, 7], [5]], [[0, 2, 6], [4]]]
    assert dropped == []
    # a sample inference skipped (index 5) leaves rank 1 empty in micro-step 0: rebalanced by tokens
    micro, dropped = plan_rows_step([r for r in res if r.index != 5], rows, 1, 2)
    assert sorted(len(p) for p in micro[0]) == [1, 1] and {r.index for p in micro[0] for r in p} == {3, 7}
    # an epoch's tail: one sample for two ranks is dropped; an all-empty micro-step is left out
    micro, dropped = plan_rows_step(res, [[3], [], [], []], 1, 2)
    assert micro == [] and [r.index for r in dropped] == [3]


def test_all_cached_pools_every_prompt_without_inference_or_backpressure():
    # a run from the feature cache: every sample is ready at once, keyed by its dataset index, and
    # holds no store bytes (a 1-byte pool limit must not hold anything back)
    prompts = [Prompt(seq, 10 + seq, 5 + seq, seq // 2) for seq in range(6)]
    positions = {s: {"epoch": 0, "index": 2 * (s + 1)} for s in range(3)}
    st = ControllerState(prompts, positions, num_ranks=2, micro_batch_size=1, max_pool_bytes=1)
    assert st.all_cached() == 6
    assert not st.buffer and not st.inflight and st.pool_bytes == 0
    assert [len(q) for q in st.queues] == [3, 3]  # every step dispatched, one sample per rank
    keys = sorted(r.key for q in st.queues for a in q for mb in a.micro for r in mb)
    assert keys == sorted(str(10 + seq) for seq in range(6))
