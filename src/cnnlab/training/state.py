"""The trainable state of a run as one object, `TrainState` (model, optimizer, scheduler, grad scaler,
EMA, lookahead average, progress and RNG), with `state_dict` / `load_state_dict` side by side: what a
checkpoint holds is exactly what resume restores. `State` is the progress part; `CHECKPOINT_FORMAT`
the version written into every checkpoint. The errors that end training live here too, because saving
refuses non-finite weights with one of them.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab import dist
from cnnlab.config import Config
from cnnlab.errors import RunError
from cnnlab.training import checkpoint as ckpt
from cnnlab.training.optim import Lookahead, build_optimizer, build_scheduler


class TrainingError(RunError, RuntimeError):
    """Training cannot go on; the message says why and what to do (the CLI prints it, exit 1)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    pass


CHECKPOINT_FORMAT = 1  # checkpoints/*.pt: TrainState.state_dict()


@dataclass
class State:
    """The run's progress, saved with the tensors in TrainState: what a resumed run needs besides them."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already done (mid-epoch checkpoint)
    best_epoch: int = 0
    best_metric: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    stopped_by: str | None = None  # why, when not by train.early_stop: e.g. a search's pruner (fit's on_epoch)
    epoch_loss_sum: float = 0.0  # running sums of the interrupted epoch
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_lr: float | None = None  # the highest learning rate of the current epoch's steps (history.csv)
    epoch_lr_min: float | None = None  # and the lowest (the progress line shows the range)
    epoch_steps: int = 0  # optimizer steps of the current epoch, and how many of them clipped the gradient
    epoch_clipped: int = 0
    epoch_seconds: float = 0.0  # training seconds of the current epoch before the last checkpoint
    train_seconds: float = 0.0  # seconds in `fit` over every session of the run (resumes add theirs)
    history: list = field(default_factory=list)


class TrainState:
    """The trainable state of a run as one object: the model, optimizer, scheduler, grad scaler (fp16),
    EMA, lookahead average and `progress` (a `State`), plus the RNG states when saved. `state_dict` and
    `load_state_dict` sit side by side, so what resume restores is what a checkpoint holds.

    `model` is the bare model (no DDP or torch.compile wrapper); `device` and `amp` (the autocast dtype,
    None for full precision) say how it runs and are not saved.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, sched, *, cfg: Config, scaler=None, ema=None,
                 lookahead: Lookahead | None = None, progress: State | None = None,
                 device: torch.device = torch.device("cpu"), amp: torch.dtype | None = None):
        self.model, self.opt, self.sched, self.scaler, self.ema, self.lookahead = model, opt, sched, scaler, ema, lookahead
        self.progress = progress if progress is not None else State()
        self.cfg, self.device, self.amp = cfg, device, amp
        self._last_saved_at: tuple[int, int] | None = None  # (epoch, step) of the last save_last
        self._session: tuple[float, float] | None = None  # (perf_counter, train_seconds) when this session began

    @classmethod
    def build(cls, cfg: Config, model: nn.Module, *, steps_per_epoch: int, device: torch.device) -> "TrainState":
        """Optimizer, schedule, grad scaler, EMA and lookahead for `model` (on `device`, initialised) per `cfg`."""
        t = cfg.train
        opt = build_optimizer(model, cfg.optim)
        sched = build_scheduler(opt, cfg.schedule, cfg.optim, epochs=t.epochs, steps_per_epoch=steps_per_epoch,
                                monitor=t.monitor)
        amp = amp_dtype(cfg, device)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        ema = None
        if t.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
        lookahead = Lookahead(t.epochs * steps_per_epoch, start=t.lookahead_start) if t.lookahead else None
        return cls(model, opt, sched, cfg=cfg, scaler=scaler, ema=ema, lookahead=lookahead, device=device, amp=amp)

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and kept as best.pt: the EMA weights when there are some, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def start_clock(self) -> None:
        """This session's training time starts now (after a resume's load): `tick` adds it to train_seconds."""
        self._session = (time.perf_counter(), self.progress.train_seconds)

    def tick(self) -> None:
        """progress.train_seconds up to now (called before every save, and when `fit` returns)."""
        if self._session is not None:
            self.progress.train_seconds = self._session[1] + time.perf_counter() - self._session[0]

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def update(self, objective: torch.Tensor, step: int) -> bool:
        """Optimizer step number `step` (1-based) on `objective` alone (`backward`, then `step`)."""
        self.backward(objective, first=True)
        return self.step(step)

    def backward(self, objective: torch.Tensor, *, first: bool) -> None:
        """Add `objective`'s gradients (through the grad scaler); `first` micro-batch of a step: zeroed before.
        Gradients stay after the step (the loop logs their norms), so they are zeroed here."""
        if first:
            self.opt.zero_grad(set_to_none=True)
        (self.scaler.scale(objective) if self.scaler is not None else objective).backward()

    def step(self, step: int) -> bool:
        """Optimizer step number `step` (1-based) on the gradients summed by `backward`: clipped per
        `train.clip_grad`, then step, schedule, the EMA and lookahead averages. Returns whether it clipped."""
        clip = self.cfg.train.clip_grad
        clipped = False
        if clip.norm is not None or clip.value is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            params = [p for p in self.model.parameters() if p.grad is not None]
            if clip.norm is not None:
                clipped = bool(torch.nn.utils.clip_grad_norm_(params, clip.norm) > clip.norm)
            else:
                clipped = any(bool(p.grad.abs().max() > clip.value) for p in params)
                torch.nn.utils.clip_grad_value_(params, clip.value)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.lookahead is not None:
            self.lookahead.step(self.model, step)
        self.progress.epoch_steps += 1
        self.progress.epoch_clipped += clipped
        return clipped

    def epoch_end(self, metric: float) -> None:
        """After an epoch's validation: a schedule on the validation metric (plateau) takes it."""
        if hasattr(self.sched, "epoch_end"):
            self.sched.epoch_end(metric)

    # ---- save and resume, side by side

    def state_dict(self, *, best: bool = False) -> dict:
        """What a checkpoint holds (plain types and tensors only). `best`: the evaluated weights
        (`eval_model`) as "model", without the EMA and lookahead copies (checkpoints/best.pt)."""
        weights = (self.eval_model if best else self.model).state_dict()
        return {"model": weights, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None and not best else None,
                "lookahead": self.lookahead.state_dict() if self.lookahead is not None and not best else None,
                "state": asdict(self.progress), "rng": ckpt.rng_state(), "format": CHECKPOINT_FORMAT}

    def load_state_dict(self, c: dict, *, source: str | Path = "the checkpoint") -> None:
        """Restore everything `state_dict` saved, the RNG states included (a resumed run continues exactly);
        weights that are not finite or do not fit the model are refused naming `source`."""
        ckpt.load_weights(self.model, c.get("model"), source)
        self.opt.load_state_dict(c["optimizer"])
        self.sched.load_state_dict(c["scheduler"])
        if self.scaler is not None and c.get("scaler"):
            self.scaler.load_state_dict(c["scaler"])
        if self.ema is not None and c.get("ema"):
            self.ema.load_state_dict(c["ema"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(c.get("lookahead"))
        self.progress = State(**c["state"])
        ckpt.set_rng_state(c["rng"])

    def save(self, path: Path, *, best: bool = False) -> None:
        """Write `state_dict` atomically; only rank 0 writes, and never a model with non-finite weights."""
        self.tick()
        if not dist.is_main():
            return
        sd = self.state_dict(best=best)
        if not ckpt.all_finite(sd["model"]) or (sd["ema"] is not None and not ckpt.all_finite(sd["ema"])):
            p = self.progress
            raise NonFiniteLossError(
                f"refusing to write {path}: the model has non-finite weights at step {p.step} (epoch "
                f"{p.epoch + (p.batch_in_epoch > 0)}). Likely causes: a learning rate too high "
                f"(optim.lr={self.cfg.optim.lr}) or fp16 overflow (try train.amp=bf16 or off). The previous "
                "checkpoint is kept.")
        ckpt.atomic_save(sd, path)

    def save_last(self, path: Path) -> None:
        """`save`, unless this (epoch, step) was saved already (a step checkpoint at an epoch's end)."""
        at = (self.progress.epoch, self.progress.step)
        if at != self._last_saved_at:
            self.save(path)
            self._last_saved_at = at

    def load(self, path: Path) -> None:
        """`load_state_dict` of a checkpoint read with weights_only=True; a file that is not a training
        checkpoint of this format is refused naming it."""
        c = ckpt.load(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "state", "rng") if k not in c]
        if missing or c.get("format") != CHECKPOINT_FORMAT:
            why = f"it has no {', '.join(map(repr, missing))}" if missing else f"format {c.get('format')!r}"
            raise ckpt.CheckpointError(f"{path}: not a cnnlab training checkpoint of format {CHECKPOINT_FORMAT} "
                                       f"({why}); cannot resume from it")
        try:
            self.load_state_dict(c, source=path)
        except ckpt.CheckpointError:
            raise
        except Exception as e:  # a damaged or foreign last.pt: refused before anything is truncated or trained
            raise ckpt.CheckpointError(f"{path}: refused, cannot resume from it ({type(e).__name__}: {e}); "
                                       "history.csv and the checkpoints are left as they were") from None


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `train.amp` asks for on this device (None: full precision; always on CPU)."""
    amp = cfg.train.amp
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16
