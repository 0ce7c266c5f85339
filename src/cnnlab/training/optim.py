"""Optimizers (sgd, adam, adamw, rmsprop, or any torch.optim optimizer by its class name with `optim.args`)
and learning-rate schedules, stepped once per optimizer step; `plateau` (ReduceLROnPlateau) also once per
epoch on the validation metric. `schedule.warmup_epochs` ramps the rate linearly before any of them."""
from __future__ import annotations

import math

import torch
from torch import nn

from cnnlab.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, o: OptimConfig) -> list[dict]:
    """Trainable parameters only (a frozen backbone never reaches the optimizer). Weight decay applies
    to conv/linear weights; biases and norm parameters (1-D) are not decayed, as is standard, unless
    `optim.decay_bias_and_norm` (then every parameter is). Batch-norm parameters get their own group at
    `optim.norm_lr_scale` times the learning rate; with `optim.decay_per_step` not times their decay per step
    (airbench's `bias_scaler` "scales up learning rate (but not weight decay)")."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}
    decay, no_decay, norm_params = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if o.norm_lr_scale != 1.0 and id(p) in norm:  # (at 1.0 the groups, and old checkpoints, stay as they were)
            norm_params.append(p)
        else:
            (decay if p.ndim > 1 or o.decay_bias_and_norm else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay, "lr": o.lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": o.lr})
    if norm_params:  # decay_per_step: at the weights' rate per step, as airbench (its lr is norm_lr_scale times
        # larger, so the coefficient, which torch multiplies by the lr, is norm_lr_scale times smaller)
        wd = (o.weight_decay / o.norm_lr_scale if o.decay_per_step else o.weight_decay) if o.decay_bias_and_norm else 0.0
        groups.append({"params": norm_params, "lr": o.lr * o.norm_lr_scale, "weight_decay": wd})
    return groups


# the config keys each optimizer with its own keys takes (any other: lr, weight decay and optim.args)
_OWN_KEYS = {"sgd": lambda o: {"momentum": o.momentum, "nesterov": o.nesterov},
             "adam": lambda o: {"betas": o.betas}, "adamw": lambda o: {"betas": o.betas}, "rmsprop": lambda o: {}}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """torch.optim's class for optim.name (case-insensitive: rmsprop -> RMSprop); config/checks.py refused others."""
    from cnnlab.config import torch_optimizers

    return getattr(torch.optim, {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}.get(name) or torch_optimizers()[name.lower()])


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over `param_groups`; `optim.args` are passed on (and win over the config's own keys)."""
    cls = optimizer_class(o.name)
    own = _OWN_KEYS.get(o.name.lower(), lambda o: {})(o)
    try:
        return cls(param_groups(model, o), **{"lr": o.lr, **own, **o.args})
    except (TypeError, ValueError) as e:
        import inspect

        from cnnlab.config import ConfigError

        takes = [p for p in inspect.signature(cls).parameters if p not in ("self", "params")]
        raise ConfigError(f"optim.args={o.args!r}: {cls.__name__} refused them ({e}); it takes "
                          f"{', '.join(takes)}") from None


def check(o: OptimConfig) -> None:
    """Build the optimizer once on a dummy parameter: bad optim.args are refused before any work."""
    import dataclasses

    build_optimizer(nn.Linear(1, 1), dataclasses.replace(o, lr=1e-3) if o.lr == "auto" else o)  # (auto: lr-find)


def warmup_steps(s: ScheduleConfig, steps_per_epoch: int) -> int:
    return int(s.warmup_epochs * steps_per_epoch) if s.name != "onecycle" else 0


def lr_factor(s: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The multiplier of the base learning rate at a (0-based) step: a linear warm-up over
    `warmup_epochs`, then (counted from its end, as SequentialLR does) `step` decays every `step_size`
    whole epochs (StepLR); `cosine` anneals to `min_lr` by the end of training."""
    warm = warmup_steps(s, steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if s.name in ("none", "plateau"):
        return 1.0
    if s.name == "step":
        return s.gamma ** (((step - warm) // steps_per_epoch) // s.step_size)
    total = epochs * steps_per_epoch
    t = (step - warm) / max(1, total - warm)
    return s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Plateau:
    """ReduceLROnPlateau on the validation metric (`epoch_end`, once per epoch), after an optional linear
    warm-up (torch's LinearLR, stepped per optimizer step by `step`); the warm-up's epochs do not count
    towards a plateau. One state dict for both."""

    def __init__(self, opt: torch.optim.Optimizer, s: ScheduleConfig, *, warm: int, monitor: str):
        self.warm, self.done = warm, 0
        self.warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warm, total_iters=warm - 1) \
            if warm > 1 else None
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max" if monitor == "val_acc" else "min", factor=s.gamma, patience=s.patience)

    def step(self) -> None:
        self.done += 1
        if self.warmup is not None and self.done < self.warm:
            self.warmup.step()

    def epoch_end(self, metric: float) -> None:
        if self.done >= self.warm and math.isfinite(metric):
            self.plateau.step(metric)

    def state_dict(self) -> dict:
        return {"done": self.done, "plateau": self.plateau.state_dict(),
                "warmup": self.warmup.state_dict() if self.warmup is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        self.done = sd["done"]
        self.plateau.load_state_dict(sd["plateau"])
        if self.warmup is not None and sd.get("warmup"):
            self.warmup.load_state_dict(sd["warmup"])


def build_scheduler(opt: torch.optim.Optimizer, s: ScheduleConfig, o: OptimConfig, *, epochs: int,
                    steps_per_epoch: int, monitor: str = "val_acc"):
    """A per-step scheduler (`.step()` after every optimizer step); `Plateau` also has `epoch_end(metric)`."""
    if s.name == "plateau":
        return Plateau(opt, s, warm=warmup_steps(s, steps_per_epoch), monitor=monitor)
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], epochs=epochs, steps_per_epoch=steps_per_epoch,
            pct_start=s.pct_start, div_factor=s.div_factor, final_div_factor=s.final_div_factor,
            anneal_strategy=s.anneal, cycle_momentum=s.cycle_momentum)
    if s.name == "cosine":  # min_lr is absolute; lr_factor wants it relative
        s = ScheduleConfig(**{**s.__dict__, "min_lr": s.min_lr / o.lr})
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(s, step, steps_per_epoch, epochs))


class Lookahead:
    """airbench's lookahead (Keller Jordan, 2024): from `start` (a fraction of training) on, every `every`
    steps the weights move to an exponential average of themselves, whose decay grows as training ends
    (rho = 0.95**every * (progress)**3: fast moves early, strong averaging late); the average is copied
    back into the model after every epoch. Floating-point buffers (batch-norm statistics) are averaged too."""

    def __init__(self, total_steps: int, start: float = 0.3, every: int = 5):
        self.total, self.first, self.every = max(1, total_steps), int(start * total_steps), every
        self.avg: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        """After optimizer step number `step` (1-based)."""
        if step < self.first or step % self.every:
            return
        if self.avg is None:
            self.avg = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
            return
        self._pull(model, rho=0.95 ** self.every * (step / self.total) ** 3)

    def end_epoch(self, model: nn.Module) -> None:
        if self.avg is not None:
            self._pull(model, rho=1.0)  # the average unchanged, copied into the model

    @torch.no_grad()
    def _pull(self, model: nn.Module, rho: float) -> None:
        """average <- rho * average + (1 - rho) * weights; weights <- average."""
        sd = model.state_dict()
        for k, a in self.avg.items():
            a.lerp_(sd[k], 1 - rho)
            sd[k].copy_(a)

    def state_dict(self) -> dict | None:
        return self.avg

    def load_state_dict(self, avg: dict | None) -> None:
        self.avg = avg
