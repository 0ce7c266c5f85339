"""Optimizers and learning-rate schedules, stepped once per training step."""
from __future__ import annotations

import math

import torch
from torch import nn

from cnnlab.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (a frozen backbone never reaches the optimizer). Weight decay applies
    to conv/linear weights; biases and norm parameters (1-D) are not decayed, as is standard."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)


def lr_factor(s: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The multiplier of the base learning rate at a (0-based) step. `step` decays every `step_size`
    whole epochs (StepLR); `cosine` anneals to `min_lr` after an optional linear warm-up."""
    epoch = step // steps_per_epoch
    if s.name == "none":
        return 1.0
    if s.name == "step":
        return s.gamma ** (epoch // s.step_size)
    total = epochs * steps_per_epoch
    warm = int(s.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_scheduler(opt: torch.optim.Optimizer, s: ScheduleConfig, o: OptimConfig, *, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                   pct_start=s.pct_start)
    if s.name == "cosine":  # min_lr is absolute; lr_factor wants it relative
        s = ScheduleConfig(**{**s.__dict__, "min_lr": s.min_lr / o.lr})
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(s, step, steps_per_epoch, epochs))
