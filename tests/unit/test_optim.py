"""LR schedules against torch's own schedulers; weight-decay groups; Lion against its formula."""

import math

import pytest
import torch

from neox.training.optim import Lion, LRSchedule, build_optimizer, param_groups


def test_cosine_matches_torch_cosine_annealing():
    lr, min_lr, iters, warm = 1e-3, 1e-4, 100, 10
    sched = LRSchedule(lr=lr, min_lr=min_lr, decay_style="cosine", decay_iters=iters, warmup=warm)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters - warm, eta_min=min_lr)
    for step in range(warm, iters + 1):
        assert sched(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        ref.step()
    assert sched(iters + 50) == pytest.approx(min_lr)  # stays at min_lr after decay_iters


def test_warmup_linear_constant_inverse_sqrt():
    s = LRSchedule(lr=1.0, min_lr=0.0, decay_style="linear", decay_iters=100, warmup=0.1)
    assert s.warmup_iters == 10
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5) and s(100) == pytest.approx(0.0)
    assert LRSchedule(lr=2.0, decay_style="constant", decay_iters=10)(7) == 2.0
    inv = LRSchedule(lr=1.0, decay_style="inverse_sqrt", decay_iters=1000, warmup=16)
    assert inv(64) == pytest.approx(math.sqrt(16 / 64))
    with pytest.raises(ValueError, match="lr_decay_style"):
        LRSchedule(lr=1.0, decay_style="exotic", decay_iters=10)


def test_no_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model.named_parameters(), 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3


def test_lion_step_matches_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    g = torch.randn(5)
    p0 = p.detach().clone()
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    p.grad = g.clone()
    opt.step()
    expected = p0 * (1 - 0.1 * 0.01) - 0.1 * torch.sign(0.1 * g)  # m starts at zero
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * g)


def test_build_optimizer_kinds():
    m = torch.nn.Linear(3, 3)
    assert isinstance(build_optimizer(m.named_parameters(), type="Adam"), torch.optim.AdamW)
    assert isinstance(build_optimizer(m.named_parameters(), type="sgd"), torch.optim.SGD)
    assert isinstance(build_optimizer(m.named_parameters(), type="lion"), Lion)
    with pytest.raises(ValueError, match="not supported"):
        build_optimizer(m.named_parameters(), type="adafactor")
