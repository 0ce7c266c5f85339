"""An epoch's running training statistics kept on the training device (`EpochSums`), so that the steps of
an epoch never wait for the GPU: the loss sum and correct count, the last step's loss and accuracy, and a
non-finite flag with the first bad step and its loss, all added by device ops and copied to the host in one
read only when the loop needs numbers (a logged step, a checkpoint, a signal, the epoch's end).

The arithmetic is the per-step host arithmetic it replaces, in the same order and in float64, so the
epoch's train_loss / train_acc are bit-identical to reading every step (tests/test_gpu_path.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cnnlab import dist
from cnnlab.config import Config

# slots of the device vector
_LOSS_SUM, _CORRECT, _STEP, _STEP_SUM, _STEP_CORRECT, _BAD, _BAD_STEP, _BAD_LOSS = range(8)


@dataclass
class Read:
    """What one read copies back: the epoch's sums so far and the last step's values."""

    loss_sum: float  # sum over the epoch's steps of (step's weighted mean loss x its images)
    correct: int
    seen: int
    step_loss: float  # the last step's (weighted) mean loss
    step_acc: float
    bad_step: int | None  # the first step whose loss was not finite (1-based, the run's numbering)
    bad_loss: float | None


class EpochSums:
    """Running sums of one epoch from `step` (the run's steps taken) and the sums a resumed epoch had."""

    def __init__(self, device: torch.device, *, step: int, loss_sum: float = 0.0, correct: int = 0, seen: int = 0):
        # one host->device copy per epoch; every later update is a device op
        self.v = torch.tensor([loss_sum, correct, step, 0, 0, 0, 0, 0], dtype=torch.float64, device=device)
        self.seen = seen  # image counts are known on the host (batch shapes)
        self.step_seen = 0

    def start_step(self) -> None:
        self.v[_STEP_SUM:_STEP_CORRECT + 1].zero_()
        self.step_seen = 0

    def micro_batch(self, total: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Add a micro-batch: `total` its summed (weighted) loss (a 0-d tensor), `correct` its count (0-d)."""
        v, t = self.v, total.detach().double()
        v[_STEP_SUM] += t
        v[_STEP_CORRECT] += correct
        self.step_seen += n
        new = ~torch.isfinite(t) & (v[_BAD] == 0)  # the first non-finite loss: its step and value, kept
        record = torch.stack([torch.ones_like(t), v[_STEP] + 1, t])
        v[_BAD:] = torch.where(new, record, v[_BAD:])

    def step_totals(self) -> torch.Tensor:
        """This rank's [loss sum, correct] of the step so far (a view on the device)."""
        return self.v[_STEP_SUM:_STEP_CORRECT + 1]

    def set_step_totals(self, totals: torch.Tensor) -> None:
        """The step's [loss sum, correct] summed over ranks (DDP), replacing this rank's own."""
        self.v[_STEP_SUM:_STEP_CORRECT + 1].copy_(totals)

    def end_step(self, denom: float, seen: int) -> None:
        """Close the step: its mean loss is the summed loss / `denom` (its total weight), over `seen` images."""
        v = self.v
        v[_STEP_SUM] /= denom
        v[_LOSS_SUM] += v[_STEP_SUM] * float(seen)
        v[_CORRECT] += v[_STEP_CORRECT]
        v[_STEP] += 1
        self.step_seen = seen
        self.seen += int(seen)

    def read(self) -> Read:
        """Copy the sums to the host (the one synchronisation)."""
        x = self.v.tolist()
        bad = x[_BAD] > 0
        return Read(loss_sum=x[_LOSS_SUM], correct=int(x[_CORRECT]), seen=self.seen, step_loss=x[_STEP_SUM],
                    step_acc=x[_STEP_CORRECT] / max(1.0, float(self.step_seen)),
                    bad_step=int(x[_BAD_STEP]) if bad else None, bad_loss=x[_BAD_LOSS] if bad else None)


def nonfinite_message(loss: float | None, step: int, epoch: int, cfg: Config, ranks: list[int],
                      found_at: int | None = None) -> str:
    """The error of a non-finite training loss at `step` (1-based) of `epoch` (1-based), seen on `ranks`;
    `found_at`: the later step whose read found it (the steps between ran on non-finite weights, unsaved)."""
    where = f" on rank {', '.join(map(str, ranks))}" if dist.active() else ""
    what = f"became {loss}" if loss is not None and not math.isfinite(loss) else "became non-finite"
    stopped = "at that step" if found_at in (None, step) else f"at step {found_at}, its first check after it"
    return (f"the training loss {what} at step {step} (epoch {epoch}){where}; training stopped {stopped}. "
            f"Likely causes: a learning rate too high (optim.lr={cfg.optim.lr}; try a tenth), inputs not "
            "normalised, fp16 overflow (try train.amp=bf16 or off), bad values (NaN/inf) in the data, or a "
            "model that divides by zero or takes the log of zero. Nothing was saved from this step; the last "
            "checkpoint and the history up to it are kept.")
