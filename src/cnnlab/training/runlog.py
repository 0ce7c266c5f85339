"""What a run writes as it goes: history.csv and steps.csv rows, their repair on resume, and the
console progress (a tqdm bar on a terminal, plain lines otherwise). Rank 0 only."""
from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

from cnnlab import dist


def append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    fields = list(row)
    if not new:  # keep the file's own columns (a run resumed by a newer version that logs more)
        with open(path, newline="") as f:
            fields = next(csv.reader(f), None) or fields
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="", lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)


def fmt(v):
    """Floats as 6 significant digits in the CSV files."""
    return f"{v:.6g}" if isinstance(v, float) else v


class Progress:
    """A tqdm bar with ETA on a terminal; otherwise (CI logs, files) a line per epoch and, in long
    epochs, a line with the step, loss and ETA every `every_s` seconds."""

    def __init__(self, mode: str, total_steps: int, epochs: int, every_s: float = 30.0):
        self.bar = None
        self.enabled = mode != "off" and dist.is_main()
        if self.enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
        self.epochs, self.total, self.every_s = epochs, total_steps, every_s
        self.start: tuple[float, int] | None = None  # (time, step) of the first step seen (resume-aware ETA)
        self.last_line = time.perf_counter()

    def step(self, n: int, loss: float | None) -> None:
        """Progress up to step `n`; `loss` None before the first step (nothing to show yet)."""
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = (now, n)
        if self.enabled and loss is not None and now - self.last_line >= self.every_s and n > self.start[1]:
            eta = (now - self.start[0]) / (n - self.start[1]) * (self.total - n)
            print(f"  step {n}/{self.total}  loss {loss:.4f}  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            self.last_line = now

    def epoch(self, row: dict, lr_low: float | None = None) -> None:
        """The epoch's line; its learning rate as the range of the rates its steps used (`lr_low` to
        row['lr'], the peak), or one value when the rate did not change."""
        if not self.enabled:
            return
        lr = f"{row['lr']:.3g}"
        if lr_low is not None and f"{lr_low:.3g}" != lr:
            lr = f"{lr_low:.3g}-{lr}"
        line = (f"epoch {row['epoch']:>3}/{self.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {lr}  {row['seconds']:.1f}s")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
            self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def truncate_after(run_dir: Path, state) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again), and any
    row a kill cut short."""
    if not dist.is_main():
        return
    for name, key, limit in (("history.csv", "epoch", state.epoch), ("steps.csv", "step", state.step),
                             ("grads.csv", "step", state.step)):
        path = run_dir / name
        if not path.exists():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        if not fields or key not in fields:  # no usable header: start the file again
            path.unlink()
            continue
        keep = [r for r in rows if _row_ok(r, key, limit)]
        if len(keep) == len(rows) and path.read_bytes().endswith(b"\n"):
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            w.writeheader()  # even with no rows left: later rows are appended under it
            w.writerows(keep)
        os.replace(tmp, path)


def _row_ok(row: dict, key: str, limit: int) -> bool:
    if None in row or any(v in (None, "") for v in row.values()):
        return False
    try:
        return int(row[key]) <= limit
    except ValueError:
        return False
