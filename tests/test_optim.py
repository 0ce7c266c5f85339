"""Optimizer parameter groups and schedules: what is decayed, batch-norm learning-rate scaling, and the
learning rate each schedule gives at each step."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnlab import config as C
from cnnlab.training.optim import build_optimizer, build_scheduler


def net():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    m[0].bias.requires_grad_(False)  # a frozen parameter never reaches the optimizer
    return m


def lrs(opt, sched, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_groups_decay_only_weights_and_skip_frozen():
    m = net()
    opt = build_optimizer(m, C.load(None, ["optim.weight_decay=0.01"]).optim)
    decayed, plain = opt.param_groups
    assert {id(p) for p in decayed["params"]} == {id(m[0].weight), id(m[4].weight)} and decayed["weight_decay"] == 0.01
    assert {id(p) for p in plain["params"]} == {id(m[1].weight), id(m[1].bias), id(m[4].bias)}
    assert plain["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "none"])
def test_norm_lr_scale_follows_every_schedule(schedule):
    m = net()
    cfg = C.load(None, ["optim.lr=0.1", "optim.norm_lr_scale=64", f"schedule.name={schedule}",
                        "schedule.warmup_epochs=1", "schedule.min_lr=0.001"])
    opt = build_optimizer(m, cfg.optim)
    assert {id(p) for p in opt.param_groups[-1]["params"]} == {id(m[1].weight), id(m[1].bias)}
    sched = build_scheduler(opt, cfg.schedule, cfg.optim, epochs=3, steps_per_epoch=4)
    for weights, biases, norm in lrs(opt, sched, 12):
        assert weights == biases and norm == pytest.approx(64 * weights, rel=1e-12)
        assert 0 < weights <= 0.1 + 1e-12


def test_schedules_give_the_documented_learning_rates():
    m = net()
    step = C.load(None, ["optim.lr=0.1", "schedule.name=step", "schedule.step_size=2", "schedule.gamma=0.5"])
    opt = build_optimizer(m, step.optim)
    got = [g[0] for g in lrs(opt, build_scheduler(opt, step.schedule, step.optim, epochs=6, steps_per_epoch=3), 18)]
    assert got == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 6)  # StepLR: x gamma every 2 epochs
    cos = C.load(None, ["optim.lr=0.1", "schedule.name=cosine", "schedule.warmup_epochs=1", "schedule.min_lr=0.01"])
    opt = build_optimizer(m, cos.optim)
    got = [g[0] for g in lrs(opt, build_scheduler(opt, cos.schedule, cos.optim, epochs=3, steps_per_epoch=4), 12)]
    assert got[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear warm-up over the first epoch
    assert got[4] == pytest.approx(0.1) and got[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(got[4:], got[5:]))


def test_bad_norm_lr_scale_is_a_config_error():
    with pytest.raises(C.ConfigError, match="optim.norm_lr_scale"):
        C.load(None, ["optim.norm_lr_scale=0"])


def test_onecycle_keeps_the_configured_momentum_unless_asked_to_cycle_it():
    """PyTorch's OneCycleLR cycles momentum between 0.85 and 0.95 by default, silently replacing
    optim.momentum; cnnlab keeps what the config says unless schedule.cycle_momentum is on."""
    m = net()
    for cycle, want in ((False, {0.9}), (True, None)):
        cfg = C.load(None, ["optim.momentum=0.9", "schedule.name=onecycle", f"schedule.cycle_momentum={cycle}"])
        opt = build_optimizer(m, cfg.optim)
        sched = build_scheduler(opt, cfg.schedule, cfg.optim, epochs=2, steps_per_epoch=5)
        seen = set()
        for _ in range(10):
            seen.add(round(opt.param_groups[0]["momentum"], 6))
            opt.step()
            sched.step()
        assert seen == want if want else (min(seen) < 0.86 and max(seen) == 0.95)


def test_onecycle_start_end_and_linear_ramps():
    m = net()
    cfg = C.load(None, ["optim.lr=1.0", "schedule.name=onecycle", "schedule.pct_start=0.25", "schedule.div_factor=5",
                        "schedule.final_div_factor=2", "schedule.anneal=linear"])
    opt = build_optimizer(m, cfg.optim)
    got = [g[0] for g in lrs(opt, build_scheduler(opt, cfg.schedule, cfg.optim, epochs=2, steps_per_epoch=10), 20)]
    assert got[0] == pytest.approx(0.2) and max(got) == pytest.approx(1.0)  # from lr/5 up to lr
    ramp = [b - a for a, b in zip(got[5:], got[6:])]
    assert all(d == pytest.approx(ramp[0]) for d in ramp)  # linear down to lr/5/2 = 0.1 at the last step
    assert got[-1] == pytest.approx(0.1)


def test_decay_bias_and_norm_decays_every_parameter():
    """Experiment 4's L2 (Adam weight_decay on model.parameters()) decays biases and batch-norm parameters
    too; by default only conv/linear weights are decayed."""
    from torch import nn as _nn

    from cnnlab.config import OptimConfig
    from cnnlab.training.optim import build_optimizer

    model = _nn.Sequential(_nn.Conv2d(1, 4, 3), _nn.BatchNorm2d(4), _nn.Flatten(), _nn.Linear(4, 2))
    n_all = len(list(model.parameters()))
    for scale in (1.0, 4.0):
        plain = build_optimizer(model, OptimConfig(name="adam", weight_decay=1e-5, norm_lr_scale=scale))
        decayed = [p for g in plain.param_groups if g["weight_decay"] > 0 for p in g["params"]]
        assert len(decayed) == 2  # the conv and linear weights
        every = build_optimizer(model, OptimConfig(name="adam", weight_decay=1e-5, decay_bias_and_norm=True,
                                                   norm_lr_scale=scale))
        assert all(g["weight_decay"] == 1e-5 for g in every.param_groups)
        assert sum(len(g["params"]) for g in every.param_groups) == n_all
