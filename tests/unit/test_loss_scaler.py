"""fp16 loss scaling: DeepSpeed's DynamicLossScaler semantics, written out by hand, and the optimizer flow."""

import pytest
import torch
from torch import nn

from megatron_ext.data_parallel import (
    DynamicLossScaler,
    MixedPrecisionOptimizer,
    StaticLossScaler,
    make_loss_scaler,
)
from megatron_ext.topology import ParallelState

# Scripted overflow pattern (O = overflow) and the scale after each update, derived by hand from DeepSpeed's
# rule with initial_scale_power=4 (16), loss_scale_window=3, hysteresis=2, min_loss_scale=1:
#  it0 .  (0+1)%3  -> 16      it1 .  2%3 -> 16           it2 .  3%3==0 -> double 32, budget 2
#  it3 O  budget 2 -> 1, 32   it4 O  budget 1 -> halve 16 it5 .  (5-4)%3 -> 16
#  it6 O  budget still 1 -> 8 it7 . 8  it8 . 8            it9 .  (9-6)%3==0 -> 16, budget 2
#  it10 O budget -> 1, 16     it11 . 16                   it12 O budget 1 -> 8
#  it13 O 4   it14 O 2   it15 O 1   it16 O max(0.5, min=1) -> 1
PATTERN = [0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1]
EXPECTED = [16, 16, 32, 32, 16, 16, 8, 8, 8, 16, 16, 16, 8, 4, 2, 1, 1]
# consecutive_hysteresis refills the budget on every clean step: it12 then only spends the budget
EXPECTED_CONSECUTIVE = [16, 16, 32, 32, 16, 16, 16, 16, 16, 32, 32, 32, 32, 16, 8, 4, 2]


def test_dynamic_scale_sequence_matches_deepspeed_rule():
    s = DynamicLossScaler(initial_scale_power=4, loss_scale_window=3, hysteresis=2, min_loss_scale=1)
    seen = []
    for overflow in PATTERN:
        s.update(bool(overflow))
        seen.append(s.scale)
    assert seen == EXPECTED


def test_consecutive_hysteresis_sequence():
    s = DynamicLossScaler(initial_scale_power=4, loss_scale_window=3, hysteresis=2, min_loss_scale=1,
                          consecutive_hysteresis=True)
    seen = []
    for overflow in PATTERN:
        s.update(bool(overflow))
        seen.append(s.scale)
    assert seen == EXPECTED_CONSECUTIVE


def test_hysteresis_one_halves_at_once_and_min_scale_can_raise():
    s = DynamicLossScaler(initial_scale_power=2, loss_scale_window=100, hysteresis=1, min_loss_scale=2)
    s.update(True)
    assert s.scale == 2
    s.update(True)
    assert s.scale == 2
    strict = DynamicLossScaler(initial_scale_power=1, hysteresis=1, min_loss_scale=2, raise_at_min_scale=True)
    with pytest.raises(RuntimeError, match="min_loss_scale"):
        strict.update(True)


def test_state_dict_round_trip_continues_identically():
    a = DynamicLossScaler(initial_scale_power=4, loss_scale_window=3, hysteresis=2)
    for o in PATTERN[:8]:
        a.update(bool(o))
    b = DynamicLossScaler(initial_scale_power=9, loss_scale_window=3, hysteresis=2)
    b.load_state_dict(a.state_dict())
    for o in PATTERN[8:]:
        a.update(bool(o))
        b.update(bool(o))
        assert a.scale == b.scale


def test_make_loss_scaler_keys():
    assert isinstance(make_loss_scaler(loss_scale=128.0), StaticLossScaler)
    static = make_loss_scaler(loss_scale=128.0)
    static.update(True)
    assert static.scale == 128.0
    dyn = make_loss_scaler(0, initial_scale_power=12, loss_scale_window=5, hysteresis=3, min_loss_scale=4)
    assert isinstance(dyn, DynamicLossScaler) and dyn.scale == 2 ** 12
    assert (dyn.window, dyn.hysteresis, dyn.min_scale) == (5, 3, 4.0)
    with pytest.raises(ValueError, match="loss_scale_window"):
        DynamicLossScaler(loss_scale_window=0)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def test_scaled_step_unscales_before_clipping():
    """Static scale 1024 + clipping == plain loss + torch clip_grad_norm_ + SGD (clip sees true grads)."""
    x, y = torch.randn(10, 6), torch.randn(10, 3)
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    model = _model()
    scaler = StaticLossScaler(1024.0)
    opt = MixedPrecisionOptimizer(model.parameters(), torch.optim.SGD, ParallelState.single(),
                                  loss_scaler=scaler, clip_grad=0.01, lr=0.1)
    for _ in range(3):
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01).item()
        ref_opt.step()
        opt.zero_grad()
        scaler.scale_loss(nn.functional.mse_loss(model(x), y)).backward()
        result = opt.step()
        assert not result.skipped and abs(result.grad_norm - ref_norm) <= 1e-5 * ref_norm
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


def test_overflow_skips_step_and_lowers_scale():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = DynamicLossScaler(initial_scale_power=8, hysteresis=1)
    opt = MixedPrecisionOptimizer(model.parameters(), torch.optim.AdamW, ParallelState.single(),
                                  loss_scaler=scaler, lr=0.1)
    scaler.scale_loss(model(torch.randn(4, 6)).sum()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    result = opt.step()
    assert result.skipped and result.loss_scale == 256 and scaler.scale == 128
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not opt.optimizer.state  # AdamW never saw the bad grads
