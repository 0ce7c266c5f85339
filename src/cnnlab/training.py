"""The training loop: data -> model -> optimizer -> epochs -> checkpoints -> history. Flat functions.

Reads top to bottom: `fit` prepares everything, then for each epoch `train_one_epoch` and
`evaluate`; the best epoch (by `train.monitor`) is kept as checkpoints/best.pt beside last.pt.
A run stopped by SIGTERM/SIGINT, a crash or a kill resumes exactly (`fit(..., resume=True)`).
"""
from __future__ import annotations

import csv
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import checkpoint as ckpt
from cnnlab import dist
from cnnlab.config import Config
from cnnlab.data.loader import Batches, Normalizer, augment_batch, epoch_order, eval_indices
from cnnlab.data.pipeline import Splits
from cnnlab.models import build_model
from cnnlab.optim import build_optimizer, build_scheduler


class NonFiniteLossError(FloatingPointError):
    pass


class Stopped(SystemExit):
    """Training was stopped by a signal after saving a resumable checkpoint."""


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
    history: list = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.world()[1])
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine; use train.device=cpu")
    return torch.device(name)


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


class _SignalGuard:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits 143/130."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _loss_fn(cfg: Config):
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def train_one_epoch(model, batches: Batches, order, *, opt, sched, scaler, ema, normalize, cfg: Config,
                    state: State, device, dtype, on_step, guard: _SignalGuard) -> None:
    """One pass over the training split from `state.batch_in_epoch`, updating `state` as it goes."""
    model.train()
    if hasattr(model, "_cnnlab_after_train"):
        model._cnnlab_after_train()
    loss_fn = _loss_fn(cfg)
    limit = cfg.train.limit_batches
    seed = cfg.train.seed
    for x, y, _ in batches.iterate(order, start_batch=state.batch_in_epoch):
        if limit is not None and state.batch_in_epoch >= limit:
            break
        step = state.step + 1  # 1-based number of the step being taken
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # augmentation depends only on (seed, step)
        x = normalize(augment_batch(x, cfg.data.augment, gen))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)  # (B, K)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {step} (epoch {state.epoch + 1}). Likely causes: "
                f"a learning rate too high (optim.lr={cfg.optim.lr}), no normalisation of the inputs, "
                "fp16 overflow (try train.amp=bf16 or off), or bad values in the data. Nothing was saved from this step.")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        n = y.shape[0]
        stats = torch.tensor([loss.item() * n, (logits.argmax(1) == y).sum().item(), n], dtype=torch.float64)
        dist.all_reduce_sum(stats)
        state.epoch_loss_sum += stats[0].item()
        state.epoch_correct += int(stats[1].item())
        state.epoch_seen += int(stats[2].item())
        state.step = step
        state.batch_in_epoch += 1
        on_step(step, stats[0].item() / max(1.0, stats[2].item()))
        if guard.signum is not None:
            raise Stopped(143 if guard.signum == signal.SIGTERM else 130)


@torch.no_grad()
def evaluate(model, batches: Batches, normalize, *, device, dtype, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) float32 and targets (N,) of a whole split, every sample exactly once across ranks."""
    model.eval()
    rank, _, world = dist.world()
    order = eval_indices(len(batches.s), rank, world) if dist.active() else torch.arange(len(batches.s))
    out, tgt = [], []
    saved_world = batches.world
    batches.world = 1  # eval blocks are already per rank
    try:
        for x, y, _ in batches.iterate(order):
            x = normalize(x)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x).float()
                if tta_flip:
                    logits = 0.5 * (logits + model(x.flip(3)).float())
            out.append(logits)
            tgt.append(y)
    finally:
        batches.world = saved_world
    k = out[0].shape[1] if out else 0
    logits = torch.cat(out) if out else torch.zeros(0, k, device=device)
    targets = torch.cat(tgt) if tgt else torch.zeros(0, dtype=torch.int64, device=device)
    return dist.gather_rows(logits).cpu(), dist.gather_rows(targets).cpu()


def _is_better(metric: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if not math.isfinite(metric):
        return False  # a non-finite metric is never chosen as best
    if best is None:
        return True
    return metric > best + min_delta if monitor == "val_acc" else metric < best - min_delta


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: Path, *, model, opt, sched, scaler, ema, state: State, cfg: Config) -> None:
    """Only rank 0 writes; a model with non-finite weights is never saved."""
    if not dist.is_main():
        return
    sd = _unwrap(model).state_dict()
    if not ckpt.all_finite(sd):
        raise NonFiniteLossError(f"refusing to write {path}: the model has non-finite weights (step {state.step})")
    obj = {"model": sd, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
           "scaler": scaler.state_dict() if scaler is not None else None,
           "ema": ema.state_dict() if ema is not None else None,
           "state": asdict(state), "rng": ckpt.rng_state(), "format": 1}
    ckpt.atomic_save(obj, path)


def build_for(cfg: Config, splits: Splits) -> nn.Module:
    return build_model(cfg.model, num_classes=len(splits.classes), in_channels=splits.channels, input_size=splits.size)


def _csv_append(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


class Progress:
    """A tqdm bar with ETA on a terminal, plain periodic lines otherwise (CI logs, files)."""

    def __init__(self, mode: str, total_steps: int, epochs: int):
        self.bar = None
        self.enabled = mode != "off" and dist.is_main()
        if self.enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
        self.epochs = epochs

    def step(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        line = (f"epoch {row['epoch']:>3}/{self.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.3g}  {row['seconds']:.1f}s")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(cfg: Config, run_dir: Path, splits: Splits, *, resume: bool = False) -> tuple[nn.Module, State]:
    """Train per `cfg` on `splits`, writing checkpoints, history.csv and steps.csv into `run_dir`."""
    t = cfg.train
    device = pick_device(t.device)
    distributed = dist.init(device)
    rank, _, world = dist.world()
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(t.seed)

    model = build_for(cfg, splits).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim)
    nb = dict(batch_size=t.batch_size, device=device, channels=splits.channels, size=splits.size,
              num_workers=cfg.data.num_workers)
    train_b = Batches(splits.train, rank=rank, world=world, drop_last=len(splits.train) > t.batch_size, **nb)
    val_b = Batches(splits.val, **{**nb, "batch_size": t.eval_batch_size})
    steps_per_epoch = min(len(train_b), t.limit_batches or len(train_b))
    sched = build_scheduler(opt, cfg.schedule, cfg.optim, epochs=t.epochs, steps_per_epoch=steps_per_epoch)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ema = None
    if t.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
    normalize = Normalizer(splits.mean, splits.std, device, t.channels_last)

    state = State()
    ckdir = run_dir / "checkpoints"
    if resume and (ckdir / "last.pt").is_file():
        c = ckpt.load(ckdir / "last.pt")
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["optimizer"])
        sched.load_state_dict(c["scheduler"])
        if scaler is not None and c.get("scaler"):
            scaler.load_state_dict(c["scaler"])
        if ema is not None and c.get("ema"):
            ema.load_state_dict(c["ema"])
        state = State(**c["state"])
        ckpt.set_rng_state(c["rng"])
        _truncate_logs(run_dir, state)
    train_model = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        train_model = torch.compile(train_model)

    progress = Progress(t.progress, t.epochs * steps_per_epoch, t.epochs)
    progress.step(state.step, float("nan"))
    main = dist.is_main()
    last_save = time.monotonic()

    def on_step(step: int, loss: float) -> None:
        nonlocal last_save
        progress.step(step, loss)
        if main and step % t.log_every == 0:
            _csv_append(run_dir / "steps.csv", {"step": step, "epoch": state.epoch + 1, "loss": _fmt(loss),
                                                "lr": _fmt(opt.param_groups[0]["lr"])})
        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
            save_checkpoint(ckdir / "last.pt", model=model, opt=opt, sched=sched, scaler=scaler, ema=ema,
                            state=state, cfg=cfg)

    eval_model = ema.module if ema is not None else model
    with _SignalGuard() as guard:
        try:
            while state.epoch < t.epochs and not state.stopped_early:
                t0 = time.perf_counter()
                lr = opt.param_groups[0]["lr"]
                order = epoch_order(len(splits.train), t.seed, state.epoch)
                train_one_epoch(train_model, train_b, order, opt=opt, sched=sched, scaler=scaler, ema=ema,
                                normalize=normalize, cfg=cfg, state=state, device=device, dtype=dtype,
                                on_step=on_step, guard=guard)
                logits, targets = evaluate(eval_model, val_b, normalize, device=device, dtype=dtype, tta_flip=t.tta_flip)
                val_loss = F.cross_entropy(logits, targets).item() if len(targets) else float("nan")
                val_acc = (logits.argmax(1) == targets).float().mean().item() if len(targets) else float("nan")
                state.epoch += 1
                row = {"epoch": state.epoch, "train_loss": state.epoch_loss_sum / max(1, state.epoch_seen),
                       "train_acc": state.epoch_correct / max(1, state.epoch_seen), "val_loss": val_loss,
                       "val_acc": val_acc, "lr": lr, "seconds": time.perf_counter() - t0}
                state.batch_in_epoch, state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0, 0.0, 0, 0
                state.history.append({k: (round(v, 4) if k == "seconds" else v) for k, v in row.items()})
                metric = val_acc if t.monitor == "val_acc" else val_loss
                if _is_better(metric, state.best_metric, t.monitor, t.early_stop.min_delta):
                    state.best_metric, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
                    save_checkpoint(ckdir / "best.pt", model=eval_model, opt=opt, sched=sched, scaler=scaler,
                                    ema=None, state=state, cfg=cfg)
                else:
                    state.bad_epochs += 1
                    if t.early_stop.patience is not None and state.bad_epochs >= t.early_stop.patience:
                        state.stopped_early = True
                if main:
                    _csv_append(run_dir / "history.csv", {k: _fmt(v) for k, v in row.items()})
                save_checkpoint(ckdir / "last.pt", model=model, opt=opt, sched=sched, scaler=scaler, ema=ema,
                                state=state, cfg=cfg)
                progress.epoch(row)
                if guard.signum is not None:
                    raise Stopped(143 if guard.signum == signal.SIGTERM else 130)
        except Stopped:
            save_checkpoint(ckdir / "last.pt", model=model, opt=opt, sched=sched, scaler=scaler, ema=ema,
                            state=state, cfg=cfg)
            progress.close()
            raise
        finally:
            progress.close()
    if state.stopped_early and main:
        print(f"stopped early after epoch {state.epoch}: no improvement of {t.monitor} for "
              f"{t.early_stop.patience} epochs (best epoch {state.best_epoch})", flush=True)
    return model, state


def _truncate_logs(run_dir: Path, state: State) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if not dist.is_main():
        return
    for name, key, limit in (("history.csv", "epoch", state.epoch), ("steps.csv", "step", state.step)):
        path = run_dir / name
        if not path.exists():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r[key]) <= limit]
        if len(keep) != len(rows):
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                if keep:
                    w = csv.DictWriter(f, fieldnames=list(keep[0]))
                    w.writeheader()
                    w.writerows(keep)
            os.replace(tmp, path)
