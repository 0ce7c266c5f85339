"""An epoch's running training statistics without a host synchronisation per step (`EpochSums`): each
step's summed loss and correct count are added into a row of a small buffer on the training device, and
the rows are copied to the host in one read only when the loop needs numbers (a logged step, a checkpoint,
a signal, the epoch's end). The read then does the per-step host arithmetic the loop used to do after
every step, in the same order (so the epoch's train_loss / train_acc are bit-identical,
tests/test_gpu_path.py), and finds the first step whose loss was not finite: the row keeps its step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cnnlab import dist
from cnnlab.config import Config


@dataclass
class Read:
    """What a read found: the epoch's sums so far and the last step's values, or the first non-finite step."""

    loss_sum: float  # sum over the epoch's steps of (step's weighted mean loss x its images)
    correct: int
    seen: int
    step_loss: float  # the last step's (weighted) mean loss
    step_acc: float
    bad_step: int | None = None  # the first step whose loss was not finite (1-based, the run's numbering)
    bad_loss: float | None = None


class EpochSums:
    """Running sums of at most `steps` optimizer steps after the run's step `step`, starting from the sums a
    resumed epoch had (`loss_sum`, `correct`, `seen`)."""

    def __init__(self, device: torch.device, *, steps: int, step: int, loss_sum: float = 0.0, correct: int = 0,
                 seen: int = 0):
        self.rows = torch.zeros(max(1, steps), 2, dtype=torch.float64, device=device)  # per step: loss sum, correct
        self.first, self.k, self.done = step, 0, 0  # the run's step before row 0; rows closed; rows read
        self.denoms: list[float] = []  # per closed row, on the host: the step's total weight and its images
        self.seens: list[int] = []
        self.loss_sum, self.correct, self.seen = loss_sum, correct, seen
        self.step_seen = 0

    def start_step(self) -> None:
        self.step_seen = 0

    def micro_batch(self, total: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Add a micro-batch: `total` its summed (weighted) loss (a 0-d tensor), `correct` its count (0-d), n images."""
        row = self.rows[self.k]
        row[0] += total.detach()  # float64 += float32: exact, as float(total.item()) was
        row[1] += correct
        self.step_seen += n

    def step_totals(self) -> torch.Tensor:
        """This rank's [loss sum, correct] of the open step (a view on the device)."""
        return self.rows[self.k]

    def set_step_totals(self, totals: torch.Tensor) -> None:
        """The step's [loss sum, correct] summed over ranks (DDP), replacing this rank's own."""
        self.rows[self.k].copy_(totals)

    def end_step(self, denom: float, seen: int) -> None:
        """Close the step: its mean loss is its summed loss / `denom` (its total weight), over `seen` images."""
        self.denoms.append(denom)
        self.seens.append(int(seen))
        self.k += 1

    def read(self) -> Read:
        """Copy the rows closed since the last read to the host (the one synchronisation) and add them up."""
        rows = self.rows[self.done:self.k].tolist()
        loss = acc = math.nan
        for r, (wsum, correct) in enumerate(rows, start=self.done):
            if not math.isfinite(wsum):
                return Read(self.loss_sum, self.correct, self.seen, loss, acc, bad_step=self.first + r + 1,
                            bad_loss=wsum)
            seen = self.seens[r]
            loss = wsum / self.denoms[r]  # the step's (weighted) mean loss, however it was split
            self.loss_sum += loss * seen
            self.correct += int(correct)
            self.seen += seen
            acc = correct / max(1.0, float(seen))
        self.done = self.k
        return Read(self.loss_sum, self.correct, self.seen, loss, acc)


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
