"""Acceptance accounting on hand-made cycle sequences (counts checked by hand)."""

from __future__ import annotations

import math

import pytest

from specforge_core.evaluation.accounting import AcceptStats, stats_from_cycles, truncate_cycle
from specforge_core.evaluation.fast import walk_cycles
from specforge_core.evaluation.speculate import accepted_prefix


def test_tau_and_rates_by_hand():
    # K=3, accepted per cycle 3, 0, 2, 1 -> committed 4, 1, 3, 2 = 10 tokens over 4 forwards
    s = stats_from_cycles([3, 0, 2, 1], steps=3)
    assert (s.cycles, s.tokens) == (4, 10)
    assert s.tau == 2.5
    # accepted >= 1: 3 cycles; >= 2: 2 cycles (3 and 2); >= 3: 1 cycle
    assert s.rates == [0.75, 0.5, 0.25]


def test_tau_is_one_plus_mean_accepted_without_truncation():
    acc = [0, 1, 1, 4, 2, 0]
    s = stats_from_cycles(acc, steps=4)
    assert s.tau == pytest.approx(1 + sum(acc) / len(acc))
    # vLLM's mean acceptance length: 1 + sum of per-position acceptance rates
    assert s.tau == pytest.approx(1 + sum(s.rates))


def test_all_accepted_gives_k_plus_one():
    s = stats_from_cycles([2, 2, 2], steps=2)
    assert s.tau == 3.0 and s.rates == [1.0, 1.0]


def test_truncated_last_cycle():
    # the drafts matched 3 tokens but only 2 tokens of budget were left: commit 2, 1 accepted
    assert truncate_cycle(3, 2) == (1, 2)
    assert truncate_cycle(0, 5) == (0, 1)
    assert truncate_cycle(2, 3) == (2, 3)
    with pytest.raises(ValueError):
        truncate_cycle(1, 0)
    s = AcceptStats(3)
    s.add_cycle(3, 4)
    s.add_cycle(*truncate_cycle(3, 2))
    assert (s.cycles, s.tokens, s.tau) == (2, 6, 3.0)
    assert s.rates == [1.0, 0.5, 0.5]


def test_bad_cycles_and_empty_stats():
    s = AcceptStats(2)
    with pytest.raises(ValueError):
        s.add_cycle(3, 4)  # more accepted than drafted
    with pytest.raises(ValueError):
        s.add_cycle(1, 1)  # committed must be accepted + 1
    assert math.isnan(s.tau) and all(math.isnan(r) for r in s.rates)


def test_merge():
    a, b = stats_from_cycles([1, 2], 2), stats_from_cycles([0], 2)
    a.merge(b)
    assert (a.cycles, a.tokens, a.at_least) == (3, 6, [2, 1])
    with pytest.raises(ValueError):
        a.merge(AcceptStats(3))


def test_accepted_prefix():
    assert accepted_prefix([5, 6, 7], [5, 6, 9, 1]) == 2
    assert accepted_prefix([5, 6, 7], [4, 6, 7, 1]) == 0
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 1]) == 3
    assert accepted_prefix([5, 6, 7], [5]) == 1  # beyond the known tokens counts as rejected


def test_walk_cycles_by_hand():
    """Prompt of 2 tokens, output y = [10, 11, 12, 13, 14, 15], K = 2. ``preds[k, t]`` = draft
    step k from position t (predicts x[t+k+2]); x = [p0, p1, 10, 11, 12, 13, 14, 15]."""
    import torch

    P, y, K = 2, [10, 11, 12, 13, 14, 15], 2
    preds = torch.full((K, P + len(y)), -1)
    # cycle 1: 1 token generated, last committed x[2], entry t=1: predicts x[3]=11, x[4]=12
    preds[:, 1] = torch.tensor([11, 12])  # both accepted -> commit 11, 12, bonus 13 (3 tokens)
    # cycle 2: 4 generated, entry t=4 predicts x[6]=14, x[7]=15
    preds[:, 4] = torch.tensor([14, 99])  # first accepted, second wrong -> commit 14, bonus 15
    res = walk_cycles(P, y, preds, K)
    assert res.cycles == [(2, 3), (1, 2)]
    # budget cut: with y ending after 13 the second cycle never runs; with y ending after 14
    # the second cycle matched 1 but only 1 token is left -> (0, 1)
    assert walk_cycles(P, y[:4], preds, K).cycles == [(2, 3)]
    assert walk_cycles(P, y[:5], preds, K).cycles == [(2, 3), (0, 1)]
