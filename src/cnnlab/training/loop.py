"""The training loop: data -> model -> optimizer -> epochs -> checkpoints -> history. Flat functions.

Reads top to bottom: `fit` builds the model and `TrainState` (everything trainable, saved and resumed
as one), then for each epoch runs the steps `train_one_epoch` yields (logging and step checkpoints
inline) and `evaluate` (without test-time augmentation unless `train.tta_every_epoch`: `train.tta` is for
the final evaluation, `evaluate_weights`); the best epoch (by `train.monitor`) is kept as checkpoints/best.pt
beside last.pt. The model's hooks (models/hooks.py) are called here, explicitly.

Resume is exact: last.pt (written atomically every epoch and every `train.checkpoint_every_steps`)
is `TrainState.state_dict()`: model, optimizer, scheduler, grad scaler, EMA, the lookahead average, the
RNG states and `State` (epoch, step, batch within the epoch, best metric, early-stopping counters, the
interrupted epoch's running sums); `load_state_dict` beside it restores exactly that. The sample order
is a function of (seed, epoch) and augmentation of (seed, step), so a run stopped by SIGTERM/SIGINT
(exit 143/130 after saving), a crash or a SIGKILL ends, once resumed, with the same history.csv (but
its `seconds` column), metrics.json and weights as a run never stopped.

Under torchrun each rank takes its slice of every global batch; gradients are weighted so that W
processes step exactly as 1 process with the same global batch (BatchNorm aside: SyncBatchNorm on
GPUs; on CPU/gloo each rank normalises with its own slice's statistics).
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import rundir as R
from cnnlab.analysis.gradients import layer_grad_norms
from cnnlab.training import checkpoint as ckpt
from cnnlab import dist
from cnnlab.training import loss as loss_mod
from cnnlab.training import feed, runlog
from cnnlab.config import Config, tta_mode
from cnnlab.data.augment import hard_targets, mix_batch
from cnnlab.data.loader import Batches, Normalizer, epoch_order, eval_indices
from cnnlab.data.pipeline import Splits
from cnnlab.models import build_model, hooks
from cnnlab.models.tta import tta_logits
from cnnlab.training.epochstats import EpochSums, nonfinite_message
from cnnlab.training.state import NonFiniteLossError, State, TrainingError, TrainState, amp_dtype
from cnnlab.training.tblog import TBLogger


class Stopped(SystemExit):
    """Training was stopped by a signal after saving a resumable checkpoint (exit code 143 / 130)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_channels_last(cfg: Config, model: nn.Module, device: torch.device) -> bool:
    """`train.channels_last` resolved for this model: on/off as set; auto = on for conv nets on CUDA, and on
    CPU when the widest conv has at least 32 output channels (measured: the four-conv net, net1, fastnet and
    cifar_5x5 1.1-1.9x faster in NHWC; LeNet-5 no faster, and 2x slower with batch norm)."""
    choice = cfg.train.channels_last
    if choice != "auto":
        return choice == "on"
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(widths) and (device.type == "cuda" or max(widths) >= 32)


def train_one_epoch(ts: TrainState, net: nn.Module, batches: Batches, order, *, normalize, cfg: Config,
                    guard: dist.SignalGuard, weights: torch.Tensor | None = None, read_at=None
                    ) -> Iterator[tuple[int, float | None, float | None, int | None]]:
    """One pass over the training split from `ts.progress.batch_in_epoch`, updating `ts` as it goes;
    `net` is `ts.model` as the steps run it (DDP, torch.compile). Yields (step, mean loss, accuracy, stop code)
    after each optimizer step; the stop code (143 / 130) says a signal reached some rank.

    An optimizer step is `train.accumulate` micro-batches of `train.batch_size` (the last step of an epoch
    may have fewer), and is exactly one step on their union: augmentation draws are made for the whole
    step's images and each micro-batch takes its rows (as each rank does under DDP), and every loss is
    divided by the whole step's total (class-)weight. DDP synchronises gradients only on the last one.

    No host synchronisation inside an epoch (one process): the running sums live on the device
    (training/epochstats.py), read after steps where `read_at(step)` (None: every step), at a signal and at
    the epoch's end; other steps yield None for loss and accuracy, and `ts.progress` holds the last read's
    sums (checkpoints follow reads). A non-finite loss raises NonFiniteLossError at the next read, naming
    its own step and epoch. Under DDP every step is read and a non-finite loss raises before its step.
    """
    state = ts.progress
    net.train()
    hooks.after_train_mode(ts.model)
    t = cfg.train
    distributed = dist.active()
    world = batches.world if distributed else 1
    ddp = getattr(net, "_orig_mod", net)  # torch.compile's wrapper around DDP
    n_order, bs, per = len(order), batches.bs, t.accumulate
    limit = min(batches.num_batches(n_order), t.limit_batches or batches.num_batches(n_order))
    dev = ts.device
    w_dev = weights.to(dev) if weights is not None else None
    num_classes = len(batches.s.classes)
    start = state.batch_in_epoch  # checkpoints are taken between optimizer steps: it starts a step
    sums = EpochSums(dev, steps=math.ceil((limit - start) / per), step=state.step, loss_sum=state.epoch_loss_sum,
                     correct=state.epoch_correct, seen=state.epoch_seen)
    for mb in feed.micro_batches(batches, order, cfg=cfg, normalize=normalize, epoch=state.epoch, start_batch=start,
                                 step=state.step, limit=limit):
        # micro-batch i of the step's first..last (global batches of the epoch), augmented and normalised
        i, first, last, step, sizes = mb.i, mb.first, mb.last, mb.step, mb.sizes
        j = i - first
        if j == 0:
            denom = loss_mod.total_weight(weights, batches.labels[order[first * bs:first * bs + sum(sizes)]])
            sums.start_step()
        x, y = mix_batch(mb.x, mb.y, cfg.data.augment, mb.gen, num_classes)  # MixUp/CutMix: y becomes (B, K) soft
        sync = not distributed or i == last or not hasattr(ddp, "no_sync")
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with torch.autocast(dev.type, dtype=ts.amp, enabled=ts.amp is not None):
                logits = net(x)  # (B, K)
                losses = loss_mod.per_sample(logits.float(), y, w_dev, t.label_smoothing)  # (B,) weighted
            total = losses.sum()
            if distributed:  # every rank stops at the same step, naming the rank(s) that saw it
                finite = bool(torch.isfinite(total))
                bad = [r for r, f in enumerate(dist.flags(not finite)) if f]
                if bad:
                    raise NonFiniteLossError(nonfinite_message(None if finite else total.item(), step,
                                                                state.epoch + 1, cfg, bad))
            # DDP averages gradients over ranks: x world, so the sum over ranks and micro-batches / denom is
            # the gradient of the step's weighted-mean loss, whatever the slices' sizes
            ts.backward(total * (world / denom), first=j == 0)
        sums.micro_batch(total, (logits.argmax(1) == hard_targets(y)).sum(), y.shape[0])
        i += 1
        if i <= last:
            continue
        lr = ts.lr()  # the rate this step uses: an epoch's rates span a range under a schedule
        state.epoch_lr = lr if state.epoch_lr is None else max(state.epoch_lr, lr)
        state.epoch_lr_min = lr if state.epoch_lr_min is None else min(state.epoch_lr_min, lr)
        ts.step(step)
        seen, stop = sums.step_seen, guard.code()
        if distributed:  # the step's sums over ranks; also tells every rank whether any rank was signalled
            stats = torch.cat([sums.step_totals().cpu(), torch.tensor([seen, stop == 143, stop == 130], dtype=torch.float64)])
            dist.all_reduce_sum(stats)
            sums.set_step_totals(stats[:2].to(dev))
            seen, stop = int(stats[2]), 143 if stats[3] > 0 else 130 if stats[4] > 0 else None
        sums.end_step(denom, seen)
        state.step = step
        state.batch_in_epoch = i
        if not (distributed or stop is not None or i == limit or read_at is None or read_at(step)):
            yield step, None, None, None
            continue
        r = sums.read()
        if r.bad_step is not None:  # the first non-finite loss since the last read, on this device
            raise NonFiniteLossError(nonfinite_message(r.bad_loss, r.bad_step, state.epoch + 1, cfg, [0],
                                                       found_at=step))
        state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = r.loss_sum, r.correct, r.seen
        yield step, r.step_loss, r.step_acc, stop


@torch.no_grad()
def evaluate(model, batches: Batches, normalize, *, device, dtype, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) float32 and targets (N,) of a whole split in its order, every sample exactly once:
    each rank evaluates one contiguous unpadded block (`eval_indices`) and the blocks are gathered.
    `tta`: the test-time augmentation (models/tta.py) averaging each image's views."""
    model.eval()
    rank, _, world = dist.world()
    n = len(batches.s)
    order = eval_indices(n, rank, world) if dist.active() else torch.arange(n)
    out, tgt = [], []
    for x, y, _ in batches.iterate(order, shard=False):
        x = normalize(x)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = tta_logits(model, x, tta)
        out.append(logits.float())
        tgt.append(y)
    k = out[0].shape[1] if out else _num_outputs(model)
    logits = torch.cat(out) if out else torch.zeros(0, k, device=device)
    targets = torch.cat(tgt) if tgt else torch.zeros(0, dtype=torch.int64, device=device)
    return dist.gather_rows(logits).cpu(), dist.gather_rows(targets).cpu()


def evaluate_weights(cfg: Config, splits: Splits, weights: dict, device: torch.device, *,
                     source: str | Path = "the weights") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of `splits.eval_set` for a state dict, in the layout and precision it trained in
    (the final evaluation of a run and `cnnlab eval` alike). Weights that do not fit are refused naming `source`."""
    model = build_for(cfg, splits)
    ckpt.load_weights(model, weights, source)
    model.to(device)
    channels_last = use_channels_last(cfg, model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    b = Batches(splits.eval_set, batch_size=cfg.train.eval_batch_size, device=device, channels=splits.channels,
                size=splits.size, num_workers=cfg.data.num_workers)
    return evaluate(model, b, Normalizer(splits.mean, splits.std, device, channels_last), device=device,
                    dtype=amp_dtype(cfg, device), tta=tta_mode(cfg.train))


def _num_outputs(model: nn.Module) -> int:
    """Classes of a model, for the (0, K) logits of a rank with an empty block (n < world size)."""
    last = [m for m in _unwrap(model).modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


def _is_better(metric: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if not math.isfinite(metric):
        return False  # a non-finite metric is never chosen as best
    if best is None:
        return True
    return metric > best + min_delta if monitor == "val_acc" else metric < best - min_delta


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_for(cfg: Config, splits: Splits) -> nn.Module:
    return build_model(cfg.model, num_classes=len(splits.classes), in_channels=splits.channels, input_size=splits.size)


def checkpoint_bytes(model: nn.Module, cfg: Config) -> int:
    """About how many bytes checkpoints/best.pt and last.pt take together: each holds the model and the
    optimizer state (~3x the parameter bytes with Adam's two moments; +1x with EMA)."""
    one = ckpt.tensor_bytes(model) * (4 if cfg.train.ema else 3) + (1 << 20)
    return 2 * one


def fit(cfg: Config, run_dir: Path, splits: Splits, *, device: torch.device,
        resume: bool = False, on_epoch=None) -> tuple[nn.Module, State]:
    """Train per `cfg` on `splits`, writing checkpoints, history.csv and steps.csv into `run_dir`.

    `on_epoch(epoch, row) -> str | None` (rank 0) is called after each epoch's evaluation with its history
    row; a text returned stops training there, as early stopping does, the text saying why (a search's
    pruner: studies/search.py). It is called before the epoch's checkpoint, so a resumed run keeps the stop.

    With `resume`, continue exactly from checkpoints/last.pt (or from the start when the run was
    stopped before its first checkpoint): the rows of history.csv/steps.csv written after that
    checkpoint are dropped and written again, stale temporary files of a killed save are removed.
    """
    t = cfg.train  # the process (threads, determinism, device, process group) is set up: cnnlab.process.setup
    distributed = dist.active()
    rank, _, world = dist.world()
    main = dist.is_main()
    seed_everything(t.seed)

    # data, model and the trainable state
    model = build_for(cfg, splits)
    nb = dict(batch_size=t.batch_size, device=device, channels=splits.channels, size=splits.size,
              num_workers=cfg.data.num_workers)
    train_b = Batches(splits.train, rank=rank, world=world, drop_last=len(splits.train) > t.batch_size, **nb)
    val_b = Batches(splits.val, **{**nb, "batch_size": t.eval_batch_size})
    channels_last = use_channels_last(cfg, model, device)
    normalize = Normalizer(splits.mean, splits.std, device, channels_last)
    model = model.to(device)
    if hooks.needs_data(model):  # e.g. fastnet's whitening stem; before EMA, SyncBatchNorm or DDP copy it
        hooks.init_from_data(model, normalize(_init_sample(splits, train_b, t.seed).to(device)))
    if distributed and device.type == "cuda":
        # batch statistics over the global batch, as in a 1-GPU run (SyncBatchNorm needs CUDA: on
        # CPU/gloo each rank normalises with its own slice's statistics; running stats come from rank 0)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(min(len(train_b), t.limit_batches or len(train_b)) / t.accumulate)  # optimizer steps
    weights = loss_mod.class_weights(cfg, splits.train.labels, splits.classes)
    balance = splits.train.labels if cfg.data.sampler == "balanced" else None
    ts = TrainState.build(cfg, model, steps_per_epoch=steps_per_epoch, device=device)

    ckdir = run_dir / R.CHECKPOINTS
    last = ckdir / R.LAST
    if main:
        ckpt.check_free_space(ckdir, checkpoint_bytes(model, cfg))
    if resume:
        if main:
            _clean_interrupted_saves(run_dir, ckdir)
        if last.is_file():
            ts.load(last)
            p = ts.progress
            if main:
                within = f", batch {p.batch_in_epoch} of epoch {p.epoch + 1}" if p.batch_in_epoch else ""
                print(f"resuming {run_dir} after epoch {p.epoch}{within} (step {p.step}) of {t.epochs}", flush=True)
        elif main:
            print(f"resuming {run_dir} from the start: it was stopped before its first checkpoint", flush=True)
        runlog.truncate_after(run_dir, ts.progress)  # rows written after the checkpoint are written again
    net = model  # what the training steps run: DDP and torch.compile wrap the model, sharing its weights
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=hooks.trainable_set_varies(model))
    if t.compile:
        net = torch.compile(net)

    state = ts.progress
    every = t.checkpoint_every_steps

    def read_at(step: int) -> bool:  # the steps whose loss is read from the device: logged or checkpointed
        return step % t.log_every == 0 or bool(every and step % every == 0)

    bar = runlog.Progress(t.progress, t.epochs * steps_per_epoch, t.epochs)
    tb = TBLogger(run_dir / R.TENSORBOARD) if main and cfg.output.tensorboard else None
    bar.step(state.step, None)  # the bar from the resumed step; no loss yet
    ts.start_clock()
    with dist.SignalGuard(distributed) as guard:
        try:
            while state.epoch < t.epochs and not state.stopped_early:
                if state.batch_in_epoch == 0:
                    state.epoch_lr = state.epoch_lr_min = None
                    state.epoch_steps = state.epoch_clipped = 0
                    state.epoch_seconds = 0.0
                hooks.before_epoch(model, state.epoch)  # e.g. fastnet's whitening bias frozen after N epochs
                started, seconds_before = time.perf_counter(), state.epoch_seconds  # (a resumed epoch's earlier part)
                order = epoch_order(len(splits.train), t.seed, state.epoch, balance=balance)  # new every epoch
                for step, loss, acc, stop in train_one_epoch(ts, net, train_b, order, normalize=normalize, cfg=cfg,
                                                             guard=guard, weights=weights, read_at=read_at):
                    state.epoch_seconds = seconds_before + time.perf_counter() - started  # saved with a checkpoint
                    bar.step(step, loss)
                    if main and step % t.log_every == 0:
                        runlog.append_row(run_dir / R.STEPS, {"step": step, "epoch": state.epoch + 1,
                                                              "loss": runlog.fmt(loss), "acc": runlog.fmt(acc),
                                                              "lr": runlog.fmt(ts.lr())})
                        # this step's gradients (unscaled by the optimizer step; averaged over ranks under DDP)
                        norms = layer_grad_norms(model)
                        if norms:
                            runlog.append_row(run_dir / R.GRADS, {"step": step, "epoch": state.epoch + 1,
                                                                  **{k: runlog.fmt(v) for k, v in norms.items()}})
                        if tb is not None:
                            tb.scalars({"step/loss": loss, "step/acc": acc, "step/lr": ts.lr()}, step)
                    if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                        ts.save_last(last)
                    if stop is not None:
                        raise Stopped(stop)
                if ts.lookahead is not None:
                    ts.lookahead.end_epoch(model)
                logits, targets = evaluate(ts.eval_model, val_b, normalize, device=device, dtype=ts.amp,
                                           tta=tta_mode(t) if t.tta_every_epoch else "none")
                val_loss = F.cross_entropy(logits, targets).item() if len(targets) else float("nan")
                val_acc = (logits.argmax(1) == targets).float().mean().item() if len(targets) else float("nan")
                state.epoch += 1
                row = {"epoch": state.epoch, "train_loss": state.epoch_loss_sum / max(1, state.epoch_seen),
                       "train_acc": state.epoch_correct / max(1, state.epoch_seen), "val_loss": val_loss,
                       "val_acc": val_acc, "lr": state.epoch_lr if state.epoch_lr is not None else ts.lr(),
                       "seconds": seconds_before + time.perf_counter() - started}
                if t.clip_grad.norm is not None or t.clip_grad.value is not None:  # the share of steps clipped
                    row[R.HISTORY_CLIPPED] = state.epoch_clipped / max(1, state.epoch_steps)
                lr_low = state.epoch_lr_min if state.epoch_lr_min is not None else row["lr"]
                state.batch_in_epoch, state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0, 0.0, 0, 0
                state.epoch_seconds = 0.0
                state.history.append({k: (round(v, 4) if k == "seconds" else v) for k, v in row.items()})
                metric = val_acc if t.monitor == "val_acc" else val_loss
                ts.epoch_end(metric)  # a plateau schedule: after the row, so the row has the epoch's own rate
                if _is_better(metric, state.best_metric, t.monitor, t.early_stop.min_delta):
                    state.best_metric, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
                    ts.save(ckdir / R.BEST, best=True)
                else:
                    state.bad_epochs += 1
                    if t.early_stop.patience is not None and state.bad_epochs >= t.early_stop.patience:
                        state.stopped_early = True
                if on_epoch is not None and not state.stopped_early:
                    reason = on_epoch(state.epoch, row) if main else None
                    reason = dist.broadcast_object(reason) if distributed else reason
                    if reason:
                        state.stopped_early, state.stopped_by = True, str(reason)
                if main:
                    runlog.append_row(run_dir / R.HISTORY, {k: runlog.fmt(v) for k, v in row.items()})
                    if tb is not None:
                        tb.scalars({f"epoch/{k}": v for k, v in row.items() if k != "epoch"}, state.epoch)
                ts.save_last(last)
                bar.epoch(row, lr_low=lr_low)
                code = dist.stop_code(guard)  # a signal during evaluation: stop now, not after another step
                if code is not None:
                    raise Stopped(code)
        except Stopped as e:
            ts.save_last(last)  # at a step boundary every rank has the same weights: rank 0 writes them
            if main:
                print(f"stopped by a signal after step {state.step} (epoch {state.epoch + 1}); resume with "
                      f"cnnlab train --resume {run_dir}", file=sys.stderr, flush=True)
            raise Stopped(e.code) from None
        finally:
            bar.close()
            if tb is not None:
                tb.close()
    ts.tick()
    if state.stopped_by and main:
        print(f"stopped after epoch {state.epoch}: {state.stopped_by}", flush=True)
    elif state.stopped_early and main:
        print(f"stopped early after epoch {state.epoch}: no improvement of {t.monitor} for "
              f"{t.early_stop.patience} epoch{'' if t.early_stop.patience == 1 else 's'} (best epoch "
              f"{state.best_epoch})", flush=True)
    return model, state


def _init_sample(splits: Splits, train_b: Batches, seed: int, k: int = 5000) -> torch.Tensor:
    """Up to `k` training images (uint8) for `hooks.init_from_data`, drawn at random (seeded, the same on
    every rank) from the whole training split: data stored class by class (the CIFAR-10 zip) would give
    the first 5,000 images' classes only, and a whitening stem fitted to four of ten classes."""
    n = len(splits.train)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(k, n)].sort().values
    if splits.train.images is not None:
        return splits.train.images[idx]
    return torch.cat([b[0] for b in train_b.iterate(idx, shard=False)])


def _clean_interrupted_saves(run_dir: Path, ckdir: Path) -> None:
    """Remove what a kill during a save left: temporary checkpoint files and log files being rewritten."""
    stale = ckpt.clean_stale_tmp(ckdir)
    for name in R.HISTORY_TMP:  # a kill during runlog.truncate_after
        (run_dir / name).unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save in {ckdir}: {', '.join(stale)}",
              flush=True)
