"""The training loop: data -> model -> optimizer -> epochs -> checkpoints -> history. Flat functions.

Reads top to bottom: `fit` prepares everything, then for each epoch `train_one_epoch` and
`evaluate`; the best epoch (by `train.monitor`) is kept as checkpoints/best.pt beside last.pt.

Resume is exact: last.pt (written atomically every epoch and every `train.checkpoint_every_steps`)
holds model, optimizer, scheduler, grad scaler, EMA, the lookahead average, the RNG states and `State`
(epoch, step, batch within the epoch, best metric, early-stopping counters, the interrupted epoch's
running sums). The
sample order is a function of (seed, epoch) and augmentation of (seed, step), so a run stopped by
SIGTERM/SIGINT (exit 143/130 after saving), a crash or a SIGKILL ends, once resumed, with the same
history.csv (but its `seconds` column), metrics.json and weights as a run never stopped.

Under torchrun each rank takes its slice of every global batch; gradients are weighted so that W
processes step exactly as 1 process with the same global batch (BatchNorm aside: SyncBatchNorm on
GPUs; on CPU/gloo each rank normalises with its own slice's statistics).
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.analysis.gradients import layer_grad_norms
from cnnlab.errors import RunError
from cnnlab.training import checkpoint as ckpt
from cnnlab import dist
from cnnlab import rundir as R
from cnnlab.training import runlog
from cnnlab.config import Config
from cnnlab.data.loader import Batches, Normalizer, augment_batch, epoch_order, eval_indices
from cnnlab.data.pipeline import Splits
from cnnlab.models import build_model
from cnnlab.training.optim import Lookahead, build_optimizer, build_scheduler
from cnnlab.training.tblog import TBLogger


class TrainingError(RunError, RuntimeError):
    """Training cannot go on; the message says why and what to do (the CLI prints it, exit 1)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    pass


class Stopped(SystemExit):
    """Training was stopped by a signal after saving a resumable checkpoint (exit code 143 / 130)."""


@dataclass
class State:
    """Everything about progress that a resumed run needs (besides model/optimizer tensors)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already done (mid-epoch checkpoint)
    best_epoch: int = 0
    best_metric: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    epoch_loss_sum: float = 0.0  # running sums of the interrupted epoch
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_lr: float | None = None  # the highest learning rate of the current epoch's steps (history.csv)
    epoch_lr_min: float | None = None  # and the lowest (the progress line shows the range)
    epoch_seconds: float = 0.0  # training seconds of the current epoch before the last checkpoint
    train_seconds: float = 0.0  # seconds in `fit` over every session of the run (resumes add theirs)
    history: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    amp = cfg.train.amp
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def use_channels_last(cfg: Config, model: nn.Module, device: torch.device) -> bool:
    """`train.channels_last` resolved for this model: on/off as set; auto = on for conv nets on CUDA, and on
    CPU when the widest conv has at least 32 output channels (measured: the four-conv net, net1, fastnet and
    cifar_5x5 1.1-1.9x faster in NHWC; LeNet-5 no faster, and 2x slower with batch norm)."""
    choice = cfg.train.channels_last
    if choice != "auto":
        return choice == "on"
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(widths) and (device.type == "cuda" or max(widths) >= 32)


def _loss_fn(cfg: Config):
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def _nonfinite_message(loss: float | None, step: int, epoch: int, cfg: Config, ranks: list[int]) -> str:
    where = f" on rank {', '.join(map(str, ranks))}" if dist.active() else ""
    what = f"became {loss}" if loss is not None and not math.isfinite(loss) else "became non-finite"
    return (f"the training loss {what} at step {step} (epoch {epoch}){where}; training stopped at that step. "
            f"Likely causes: a learning rate too high (optim.lr={cfg.optim.lr}; try a tenth), inputs not "
            "normalised, fp16 overflow (try train.amp=bf16 or off), bad values (NaN/inf) in the data, or a "
            "model that divides by zero or takes the log of zero. Nothing was saved from this step; the last "
            "checkpoint and the history up to it are kept.")


def train_one_epoch(model, batches: Batches, order, *, opt, sched, scaler, ema, normalize, cfg: Config,
                    state: State, device, dtype, on_step, guard: dist.SignalGuard, lookahead=None) -> None:
    """One pass over the training split from `state.batch_in_epoch`, updating `state` as it goes.

    A non-finite loss raises NonFiniteLossError before the optimizer step (so no weight and no
    checkpoint ever holds it). A signal raises Stopped at the step boundary after `on_step`.
    """
    model.train()
    bare = _unwrap(model)
    if hasattr(bare, "_cnnlab_after_train"):
        bare._cnnlab_after_train()
    loss_fn = _loss_fn(cfg)
    limit = cfg.train.limit_batches
    seed = cfg.train.seed
    distributed = dist.active()
    world = batches.world if distributed else 1
    for x, y, _ in batches.iterate(order, start_batch=state.batch_in_epoch):
        if limit is not None and state.batch_in_epoch >= limit:
            break
        step = state.step + 1  # 1-based number of the step being taken
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # augmentation depends only on (seed, step)
        i, n_order = state.batch_in_epoch, len(order)
        # random draws for the whole global batch, this rank's rows of them: the same images as with 1 process
        offset, total = (batches.local_offset(i, n_order), batches.global_size(i, n_order)) if world > 1 else (0, None)
        x = normalize(augment_batch(x, cfg.data.augment, gen, offset=offset, total=total))  # (B, C, H, W) float
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)  # (B, K)
            loss = loss_fn(logits.float(), y)
        finite = bool(torch.isfinite(loss))
        if distributed:  # every rank stops at the same step, naming the rank(s) that saw it
            bad = [r for r, f in enumerate(dist.flags(not finite)) if f]
        else:
            bad = [] if finite else [0]
        if bad:
            raise NonFiniteLossError(_nonfinite_message(None if finite else loss.item(), step, state.epoch + 1,
                                                        cfg, bad))
        lr = opt.param_groups[0]["lr"]  # the rate this step uses: an epoch's rates span a range under a schedule
        state.epoch_lr = lr if state.epoch_lr is None else max(state.epoch_lr, lr)
        state.epoch_lr_min = lr if state.epoch_lr_min is None else min(state.epoch_lr_min, lr)
        n = y.shape[0]
        # DDP averages gradients over ranks; weight each rank's mean by its share of the global batch,
        # so uneven slices (batch size not divisible by the world size) give the 1-process gradient.
        share = n * world / max(1, batches.global_size(i, n_order))
        opt.zero_grad(set_to_none=True)
        objective = loss if share == 1 else loss * share
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.step(opt)
            scaler.update()
        else:
            objective.backward()
            opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(bare)
        if lookahead is not None:
            lookahead.step(bare, step)
        stats = torch.tensor([loss.item() * n, (logits.argmax(1) == y).sum().item(), n,
                              guard.code() == 143, guard.code() == 130], dtype=torch.float64)
        dist.all_reduce_sum(stats)  # also tells every rank whether any rank was signalled
        state.epoch_loss_sum += stats[0].item()
        state.epoch_correct += int(stats[1].item())
        state.epoch_seen += int(stats[2].item())
        state.step = step
        state.batch_in_epoch += 1
        on_step(step, stats[0].item() / max(1.0, stats[2].item()), stats[1].item() / max(1.0, stats[2].item()))
        if stats[3] > 0 or stats[4] > 0:
            raise Stopped(143 if stats[3] > 0 else 130)


@torch.no_grad()
def evaluate(model, batches: Batches, normalize, *, device, dtype, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) float32 and targets (N,) of a whole split in its order, every sample exactly once:
    each rank evaluates one contiguous unpadded block (`eval_indices`) and the blocks are gathered."""
    model.eval()
    rank, _, world = dist.world()
    n = len(batches.s)
    order = eval_indices(n, rank, world) if dist.active() else torch.arange(n)
    out, tgt = [], []
    for x, y, _ in batches.iterate(order, shard=False):
        x = normalize(x)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x).float()
            if tta_flip:
                logits = 0.5 * (logits + model(x.flip(3)).float())
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
                    dtype=amp_dtype(cfg, device), tta_flip=cfg.train.tta_flip)


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


def save_checkpoint(path: Path, *, model, opt, sched, scaler, ema, state: State, cfg: Config, lookahead=None) -> None:
    """Only rank 0 writes; a model with non-finite weights is never saved."""
    if not dist.is_main():
        return
    sd = _unwrap(model).state_dict()
    if not ckpt.all_finite(sd) or (ema is not None and not ckpt.all_finite(ema.state_dict())):
        raise NonFiniteLossError(
            f"refusing to write {path}: the model has non-finite weights at step {state.step} (epoch "
            f"{state.epoch + (state.batch_in_epoch > 0)}). Likely causes: a learning rate too high "
            f"(optim.lr={cfg.optim.lr}) or fp16 overflow (try train.amp=bf16 or off). The previous checkpoint is kept.")
    obj = {"model": sd, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
           "scaler": scaler.state_dict() if scaler is not None else None,
           "ema": ema.state_dict() if ema is not None else None,
           "lookahead": lookahead.state_dict() if lookahead is not None else None,
           "state": asdict(state), "rng": ckpt.rng_state(), "format": 1}
    ckpt.atomic_save(obj, path)


def build_for(cfg: Config, splits: Splits) -> nn.Module:
    return build_model(cfg.model, num_classes=len(splits.classes), in_channels=splits.channels, input_size=splits.size)


def checkpoint_bytes(model: nn.Module, cfg: Config) -> int:
    """About how many bytes checkpoints/best.pt and last.pt take together: each holds the model and the
    optimizer state (~3x the parameter bytes with Adam's two moments; +1x with EMA)."""
    one = ckpt.tensor_bytes(model) * (4 if cfg.train.ema else 3) + (1 << 20)
    return 2 * one


def fit(cfg: Config, run_dir: Path, splits: Splits, *, device: torch.device,
        resume: bool = False) -> tuple[nn.Module, State]:
    """Train per `cfg` on `splits`, writing checkpoints, history.csv and steps.csv into `run_dir`.

    With `resume`, continue exactly from checkpoints/last.pt (or from the start when the run was
    stopped before its first checkpoint): the rows of history.csv/steps.csv written after that
    checkpoint are dropped and written again, stale temporary files of a killed save are removed.
    """
    t = cfg.train  # the process (threads, determinism, device, process group) is set up: cnnlab.process.setup
    distributed = dist.active()
    rank, _, world = dist.world()
    main = dist.is_main()
    seed_everything(t.seed)

    model = build_for(cfg, splits)
    nb = dict(batch_size=t.batch_size, device=device, channels=splits.channels, size=splits.size,
              num_workers=cfg.data.num_workers)
    train_b = Batches(splits.train, rank=rank, world=world, drop_last=len(splits.train) > t.batch_size, **nb)
    val_b = Batches(splits.val, **{**nb, "batch_size": t.eval_batch_size})
    channels_last = use_channels_last(cfg, model, device)
    normalize = Normalizer(splits.mean, splits.std, device, channels_last)
    model = model.to(device)
    if hasattr(model, "init_from_data"):  # data-dependent init (e.g. fastnet's whitening stem); before EMA copies it
        sample = splits.train.images[:5000] if splits.train.images is not None else \
            next(iter(train_b.iterate(torch.arange(min(5000, len(splits.train))), shard=False)))[0]
        model.init_from_data(normalize(sample.to(device)))
    if distributed and device.type == "cuda":
        # batch statistics over the global batch, as in a 1-GPU run (SyncBatchNorm needs CUDA: on
        # CPU/gloo each rank normalises with its own slice's statistics; running stats come from rank 0)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim)
    steps_per_epoch = min(len(train_b), t.limit_batches or len(train_b))
    sched = build_scheduler(opt, cfg.schedule, cfg.optim, epochs=t.epochs, steps_per_epoch=steps_per_epoch)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ema = None
    if t.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
    lookahead = Lookahead(t.epochs * steps_per_epoch) if t.lookahead else None

    ckdir = run_dir / R.CHECKPOINTS
    if main:
        ckpt.check_free_space(ckdir, checkpoint_bytes(model, cfg))
    state = State()
    if resume:
        if main:
            stale = ckpt.clean_stale_tmp(ckdir)
            for name in R.HISTORY_TMP:  # a kill during _truncate_logs
                (run_dir / name).unlink(missing_ok=True)
            if stale:
                print(f"removed {len(stale)} temporary file(s) of an interrupted save in {ckdir}: "
                      f"{', '.join(stale)}", flush=True)
        if (ckdir / R.LAST).is_file():
            c = ckpt.load(ckdir / R.LAST)
            try:
                ckpt.load_weights(model, c.get("model"), ckdir / R.LAST)
                opt.load_state_dict(c["optimizer"])
                sched.load_state_dict(c["scheduler"])
                if scaler is not None and c.get("scaler"):
                    scaler.load_state_dict(c["scaler"])
                if ema is not None and c.get("ema"):
                    ema.load_state_dict(c["ema"])
                if lookahead is not None:
                    lookahead.load_state_dict(c.get("lookahead"))
                state = State(**c["state"])
                ckpt.set_rng_state(c["rng"])
            except ckpt.CheckpointError:
                raise
            except Exception as e:  # a damaged or foreign last.pt: refused before anything is truncated or trained
                raise ckpt.CheckpointError(f"{ckdir / R.LAST}: refused, cannot resume from it ({type(e).__name__}: "
                                           f"{e}); history.csv and the checkpoints are left as they were") from None
            if main:
                within = f", batch {state.batch_in_epoch} of epoch {state.epoch + 1}" if state.batch_in_epoch else ""
                print(f"resuming {run_dir} after epoch {state.epoch}{within} (step {state.step}) of {t.epochs}",
                      flush=True)
        elif main:
            print(f"resuming {run_dir} from the start: it was stopped before its first checkpoint", flush=True)
        runlog.truncate_after(run_dir, state)  # rows written after the checkpoint are written again
    train_model = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        train_model = torch.compile(train_model)

    progress = runlog.Progress(t.progress, t.epochs * steps_per_epoch, t.epochs)
    tb = TBLogger(run_dir / R.TENSORBOARD) if main and cfg.output.tensorboard else None
    progress.step(state.step, None)  # the bar from the resumed step; no loss yet
    saved_at = None  # (epoch, step) of the last write of last.pt
    session = (time.perf_counter(), state.train_seconds)  # this session's start, the earlier sessions' time

    def tick() -> None:  # state.train_seconds up to now, before it is checkpointed or returned
        state.train_seconds = session[1] + time.perf_counter() - session[0]

    def save_last() -> None:
        nonlocal saved_at
        tick()
        if saved_at != (state.epoch, state.step):
            save_checkpoint(ckdir / R.LAST, model=model, opt=opt, sched=sched, scaler=scaler, ema=ema,
                            state=state, cfg=cfg, lookahead=lookahead)
            saved_at = (state.epoch, state.step)

    clock = [0.0]  # perf_counter() when state.epoch_seconds was last brought up to date

    def on_step(step: int, loss: float, acc: float) -> None:
        now = time.perf_counter()
        state.epoch_seconds += now - clock[0]  # so a checkpoint knows how long its epoch has taken
        clock[0] = now
        progress.step(step, loss)
        if main and step % t.log_every == 0:
            runlog.append_row(run_dir / R.STEPS, {"step": step, "epoch": state.epoch + 1, "loss": runlog.fmt(loss),
                                                  "acc": runlog.fmt(acc),
                                                  "lr": runlog.fmt(opt.param_groups[0]["lr"])})
            # this step's gradients (unscaled by the optimizer step; averaged over ranks under DDP)
            norms = layer_grad_norms(_unwrap(model))
            if norms:
                runlog.append_row(run_dir / R.GRADS, {"step": step, "epoch": state.epoch + 1,
                                                      **{k: runlog.fmt(v) for k, v in norms.items()}})
            if tb is not None:
                tb.scalars({"step/loss": loss, "step/lr": opt.param_groups[0]["lr"]}, step)
        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
            save_last()

    eval_model = ema.module if ema is not None else model
    with dist.SignalGuard(distributed) as guard:
        try:
            while state.epoch < t.epochs and not state.stopped_early:
                clock[0] = time.perf_counter()
                if state.batch_in_epoch == 0:
                    state.epoch_lr = state.epoch_lr_min = None
                    state.epoch_seconds = 0.0
                order = epoch_order(len(splits.train), t.seed, state.epoch)  # reshuffled every epoch
                train_one_epoch(train_model, train_b, order, opt=opt, sched=sched, scaler=scaler, ema=ema,
                                normalize=normalize, cfg=cfg, state=state, device=device, dtype=dtype,
                                on_step=on_step, guard=guard, lookahead=lookahead)
                if lookahead is not None:
                    lookahead.end_epoch(model)
                logits, targets = evaluate(eval_model, val_b, normalize, device=device, dtype=dtype, tta_flip=t.tta_flip)
                val_loss = F.cross_entropy(logits, targets).item() if len(targets) else float("nan")
                val_acc = (logits.argmax(1) == targets).float().mean().item() if len(targets) else float("nan")
                state.epoch += 1
                seconds = state.epoch_seconds + time.perf_counter() - clock[0]
                row = {"epoch": state.epoch, "train_loss": state.epoch_loss_sum / max(1, state.epoch_seen),
                       "train_acc": state.epoch_correct / max(1, state.epoch_seen), "val_loss": val_loss,
                       "val_acc": val_acc, "lr": state.epoch_lr if state.epoch_lr is not None else opt.param_groups[0]["lr"],
                       "seconds": seconds}
                lr_low = state.epoch_lr_min if state.epoch_lr_min is not None else row["lr"]
                state.batch_in_epoch, state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0, 0.0, 0, 0
                state.epoch_seconds = 0.0
                state.history.append({k: (round(v, 4) if k == "seconds" else v) for k, v in row.items()})
                metric = val_acc if t.monitor == "val_acc" else val_loss
                if _is_better(metric, state.best_metric, t.monitor, t.early_stop.min_delta):
                    state.best_metric, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
                    tick()
                    save_checkpoint(ckdir / R.BEST, model=eval_model, opt=opt, sched=sched, scaler=scaler,
                                    ema=None, state=state, cfg=cfg)
                else:
                    state.bad_epochs += 1
                    if t.early_stop.patience is not None and state.bad_epochs >= t.early_stop.patience:
                        state.stopped_early = True
                if main:
                    runlog.append_row(run_dir / R.HISTORY, {k: runlog.fmt(v) for k, v in row.items()})
                    if tb is not None:
                        tb.scalars({f"epoch/{k}": v for k, v in row.items() if k != "epoch"}, state.epoch)
                save_last()
                progress.epoch(row, lr_low=lr_low)
                code = dist.stop_code(guard)  # a signal during evaluation: stop now, not after another step
                if code is not None:
                    raise Stopped(code)
        except Stopped as e:
            save_last()  # at a step boundary every rank has the same weights: rank 0 writes them
            if main:
                print(f"stopped by a signal after step {state.step} (epoch {state.epoch + 1}); resume with "
                      f"cnnlab train --resume {run_dir}", file=sys.stderr, flush=True)
            raise Stopped(e.code) from None
        finally:
            progress.close()
            if tb is not None:
                tb.close()
    tick()
    if state.stopped_early and main:
        print(f"stopped early after epoch {state.epoch}: no improvement of {t.monitor} for "
              f"{t.early_stop.patience} epoch{'' if t.early_stop.patience == 1 else 's'} (best epoch {state.best_epoch})", flush=True)
    return model, state
