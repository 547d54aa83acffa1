"""LR schedules: hand-computed multipliers."""

from __future__ import annotations

import math

import pytest
import torch
from specforge_defaults.schedulers import DecayOptions, make_constant, make_cosine, make_linear

# total 110 steps, 10 warmup: decay spans steps 10..110 (100 steps), midpoint at step 60


def test_warmup_is_linear_from_first_step():
    for make in (make_constant, make_linear, make_cosine):
        f = make(None, 110, 10)
        assert f(0) == pytest.approx(0.1)
        assert f(4) == pytest.approx(0.5)
        assert f(9) == pytest.approx(1.0)  # last warmup step reaches the peak
        assert f(10) == pytest.approx(1.0)  # decay starts at the peak


def test_constant():
    f = make_constant(None, 110, 10)
    assert [f(s) for s in (10, 60, 109, 110, 500)] == [1.0] * 5


def test_linear():
    f = make_linear(DecayOptions(min_lr_ratio=0.0), 110, 10)
    assert f(60) == pytest.approx(0.5)
    assert f(85) == pytest.approx(0.25)
    assert f(109) == pytest.approx(0.01)
    assert f(110) == pytest.approx(0.0)
    assert f(1000) == pytest.approx(0.0)  # clamped past the end
    g = make_linear(DecayOptions(min_lr_ratio=0.2), 110, 10)
    assert g(60) == pytest.approx(0.6)
    assert g(110) == pytest.approx(0.2)


def test_cosine():
    f = make_cosine(DecayOptions(min_lr_ratio=0.0), 110, 10)
    assert f(60) == pytest.approx(0.5)
    assert f(35) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # ~0.8536
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    g = make_cosine(DecayOptions(min_lr_ratio=0.1), 110, 10)
    assert g(60) == pytest.approx(0.55)
    assert g(110) == pytest.approx(0.1)
    assert g(10_000) == pytest.approx(0.1)


def test_no_warmup():
    f = make_cosine(None, 100, 0)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5)
    assert make_linear(None, 100, 0)(25) == pytest.approx(0.75)


def test_single_step():
    for make in (make_constant, make_linear, make_cosine):
        assert make(None, 1, 0)(0) == pytest.approx(1.0)
        assert make(None, 1, 1)(0) == pytest.approx(1.0)


def test_works_with_lambda_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_linear(None, 4, 2))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.0, 0.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        make_cosine(None, 0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_linear(None, 10, -1)
