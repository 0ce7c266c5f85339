"""The learning-rate range test (Smith 2017, "Cyclical learning rates"; fastai's `lr_find`): a short run on the
training split whose learning rate grows exponentially from `start` to `end` over `steps` optimizer steps,
the loss smoothed (an exponential moving average with bias correction, beta 0.98, as fastai), stopped once
the smoothed loss passes `diverge` x its minimum or turns non-finite. Used by `cnnlab lr-find` (training/cli.py)
and by `optim.lr: auto` (experiment.run runs it first and records the result). The steps are the training
loop's own (`loop.train_one_epoch`: augmentation, AMP, DDP as in training); nothing of the model is kept.

The suggestion is a tenth of the learning rate where the smoothed loss was lowest (fastai v1's `min/10`),
not the steepest descent: on 100 noisy steps the steepest slope often lands on an early flat stretch (with
Adam, or a net whose loss stays at log K for decades of rates) and moves by a decade between seeds, while the
minimum is where the loss stops improving before it blows up; one decade below it leaves a margin against
divergence over a whole run. The steepest point is reported beside it (`steepest`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab import config as C
from cnnlab import rundir as R

START, END, STEPS, BETA, DIVERGE = 1e-7, 10.0, 100, 0.98, 4.0


@dataclass
class LRFind:
    """The curve (one row per step taken) and what it suggests."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float] = field(default_factory=list)
    suggestion: float | None = None  # lr_min / 10, two significant digits
    lr_min: float | None = None  # the learning rate where the smoothed loss was lowest
    steepest: float | None = None  # where the smoothed loss fell fastest (per decade), before the minimum
    stopped: str = ""  # why the test ended

    def summary(self) -> dict:
        return {"suggestion": self.suggestion, "lr_min": self.lr_min, "steepest": self.steepest,
                "method": "lr_min / 10", "steps": len(self.lrs), "start_lr": self.lrs[0] if self.lrs else None,
                "end_lr": self.lrs[-1] if self.lrs else None, "stopped": self.stopped}


def schedule(start: float, end: float, steps: int) -> list[float]:
    """The learning rate of each step: start * (end / start) ** (k / (steps - 1)), k = 0 .. steps - 1."""
    return [start * (end / start) ** (k / max(1, steps - 1)) for k in range(steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Exponential moving average with bias correction: avg_k / (1 - beta ** (k + 1))."""
    out, avg = [], 0.0
    for k, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (k + 1)))
    return out


def diverged(smoothed: list[float], factor: float = DIVERGE) -> bool:
    """The last smoothed loss is non-finite or above `factor` x the lowest so far."""
    last = smoothed[-1]
    return not math.isfinite(last) or (len(smoothed) > 1 and last > factor * min(smoothed))


def suggest(result: LRFind) -> LRFind:
    """Fill in smoothed, lr_min, steepest and the suggestion (lr_min / 10, rounded to 2 significant digits)."""
    result.smoothed = smooth(result.losses)
    s = np.asarray(result.smoothed, dtype=np.float64)
    lrs = np.asarray(result.lrs, dtype=np.float64)
    if not len(s) or not np.isfinite(s).any():
        return result
    i = int(np.nanargmin(np.where(np.isfinite(s), s, np.nan)))
    result.lr_min = float(lrs[i])
    result.suggestion = float(f"{lrs[i] / 10:.2g}")
    if i >= 2:  # the steepest fall of the smoothed loss per decade of learning rate, before the minimum
        slope = np.gradient(s[: i + 1], np.log10(lrs[: i + 1]))
        result.steepest = float(lrs[int(np.argmin(slope))])
    return result


def range_test(cfg: C.Config, splits, device, *, start: float = START, end: float = END, steps: int = STEPS,
               diverge: float = DIVERGE) -> LRFind:
    """Run the range test for `cfg` (its model, optimizer, batch size, augmentation; no schedule, EMA or
    lookahead) on `splits.train`. Under torchrun every rank runs it (one DDP model), and every rank gets the
    same result (the losses are all-reduced)."""
    import torch

    from cnnlab import dist
    from cnnlab.data.loader import Batches, Normalizer, epoch_order
    from cnnlab.models import hooks
    from cnnlab.training import loop as T
    from cnnlab.training.loss import class_weights
    from cnnlab.training.optim import build_optimizer
    from cnnlab.training.state import NonFiniteLossError, TrainState, amp_dtype

    if not (0 < start < end) or steps < 2:
        raise C.ConfigError(f"lr-find: needs 0 < start ({start}) < end ({end}) and at least 2 steps ({steps})")
    t = cfg.train
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=start), schedule=C.ScheduleConfig(),
                              train=dataclasses.replace(t, ema=None, lookahead=False))
    T.seed_everything(t.seed)
    rank, _, world = dist.world()
    model = T.build_for(cfg, splits).to(device)
    train_b = Batches(splits.train, rank=rank, world=world, drop_last=len(splits.train) > t.batch_size,
                      batch_size=t.batch_size, device=device, channels=splits.channels, size=splits.size,
                      num_workers=cfg.data.num_workers)
    channels_last = T.use_channels_last(cfg, model, device)
    normalize = Normalizer(splits.mean, splits.std, device, channels_last)
    if hooks.needs_data(model):
        hooks.init_from_data(model, normalize(T._init_sample(splits, train_b, cfg.train.seed).to(device)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lrs = schedule(start, end, steps)
    opt = build_optimizer(model, cfg.optim)  # every group at its own multiple of `start` (norm_lr_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lrs[min(k, steps - 1)] / start)
    ts = TrainState(model, opt, sched, cfg=cfg, device=device, amp=amp_dtype(cfg, device))
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.active() else model
    weights = class_weights(cfg, splits.train.labels, splits.classes)  # the run's own objective and sampling
    balance = splits.train.labels if cfg.data.sampler == "balanced" else None
    result, epoch = LRFind(lrs=[], losses=[]), 0
    with dist.SignalGuard(dist.active()) as guard:
        try:
            while len(result.losses) < steps and not result.stopped:
                ts.progress.batch_in_epoch = 0
                order = epoch_order(len(splits.train), t.seed, epoch, balance=balance)
                for step, loss, _, stop in T.train_one_epoch(ts, net, train_b, order, normalize=normalize, cfg=cfg,
                                                             guard=guard, weights=weights):
                    result.lrs.append(lrs[step - 1])  # the rate this step used
                    result.losses.append(loss)
                    if stop is not None:
                        raise T.Stopped(stop)
                    if diverged(smooth(result.losses), diverge):
                        result.stopped = f"the smoothed loss passed {diverge:g}x its minimum at lr {lrs[step - 1]:.3g}"
                    elif len(result.losses) >= steps:
                        result.stopped = f"all {steps} steps taken, up to lr {lrs[-1]:.3g}"
                    if result.stopped:
                        break
                epoch += 1
        except NonFiniteLossError:
            result.stopped = f"the loss became non-finite at lr {lrs[len(result.losses)]:.3g}"
    return suggest(result)


def with_lr(cfg: C.Config, lr: float) -> C.Config:
    """`cfg` with optim.lr set to `lr` (the value `optim.lr: auto` resolves to)."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=float(lr)))


def write_curve(result: LRFind, path: Path) -> Path:
    """The curve as CSV: step, lr, loss, smoothed (atomic)."""
    rows = [{"step": i + 1, "lr": f"{lr:.6g}", "loss": f"{v:.6g}", "smoothed": f"{s:.6g}"}
            for i, (lr, v, s) in enumerate(zip(result.lrs, result.losses, result.smoothed))]
    R.write_csv(path, ["step", "lr", "loss", "smoothed"], rows)
    return path


def read_curve(path: Path) -> LRFind:
    """A saved curve, its suggestion computed again from the losses."""
    rows = R.read_csv(path)
    return suggest(LRFind(lrs=[float(r["lr"]) for r in rows], losses=[float(r["loss"]) for r in rows]))


def plot(result: LRFind):
    """The smoothed loss against the learning rate (log axis), the raw loss faint, the suggestion marked."""
    from cnnlab.report import plots as P

    return P.lr_find(result.lrs, result.losses, result.smoothed, suggestion=result.suggestion,
                     lr_min=result.lr_min, steepest=result.steepest)


def describe(result: LRFind) -> str:
    """One sentence: the suggestion and where it comes from."""
    if result.suggestion is None:
        return f"lr-find: no suggestion ({result.stopped or 'no finite loss'})"
    edge = " (the loss was still falling at the largest rate tried: raise --end-lr)" \
        if result.lr_min == result.lrs[-1] and not result.stopped.startswith(("the smoothed", "the loss")) else ""
    return (f"suggested learning rate {result.suggestion:g}: a tenth of {result.lr_min:.3g}, where the smoothed "
            f"loss was lowest{edge}; steepest descent at {result.steepest:.3g}" if result.steepest else
            f"suggested learning rate {result.suggestion:g}: a tenth of {result.lr_min:.3g}, where the smoothed "
            f"loss was lowest{edge}")


def main(args) -> int:
    """`cnnlab lr-find CONFIG [overrides]`: run the test; write only lr_find.png and lr_find.csv into --out
    (default <output.dir>/<output.name>-lr-find); print the suggestion and the override that uses it."""
    from cnnlab import dist, process
    from cnnlab.data.pipeline import prepare
    from cnnlab.training import experiment

    cfg = C.load(args.config, args.overrides)
    experiment.check_names(cfg)
    cfg = experiment.with_weight_defaults(cfg)
    device = process.setup(cfg)
    out = Path(args.out) if args.out else Path(cfg.output.dir) / f"{cfg.output.name or 'run'}-lr-find"
    if out.exists() and not out.is_dir():
        raise C.ConfigError(f"--out {out}: exists and is not a folder")
    with dist.local_main_first():
        splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
    result = range_test(cfg, splits, device, start=args.start_lr, end=args.end_lr, steps=args.steps)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_curve(result, out / R.LR_FIND_CSV)
        from cnnlab.report import plots as P

        P.save(plot(result), out / R.LR_FIND_PNG)
        print(f"lr-find: {len(result.lrs)} steps from {result.lrs[0]:.3g} ({result.stopped})")
        print(describe(result))
        if result.suggestion is not None:
            print(f"use it: cnnlab train {args.config} optim.lr={result.suggestion:g}")
        print(f"plot: {out / R.LR_FIND_PNG}   curve: {out / R.LR_FIND_CSV}")
    dist.shutdown()
    return 0 if result.suggestion is not None else 1
