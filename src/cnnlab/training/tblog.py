"""TensorBoard scalars, written live by the training loop (rank 0) when tensorboard is installed.

`tensorboard --logdir runs` then shows step/loss, step/acc (the batch accuracy), step/lr and
epoch/{train,val}_{loss,acc} while a run trains; `cnnlab report RUN --tensorboard` replays a finished run's
CSV files into the same tags.
"""
from __future__ import annotations

from pathlib import Path


class TBLogger:
    """Scalars to TensorBoard event files when torch.utils.tensorboard is importable; a no-op otherwise.

    >>> tb = TBLogger(run.dir / "tensorboard"); tb.scalars({"loss/train": 0.3}, step=10); tb.close()
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        except Exception:  # tensorboard not installed (ImportError) or unusable: log nothing
            self.writer = None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, float(value), int(step))

    def scalars(self, values: dict, step: int) -> None:
        for tag, v in values.items():
            self.scalar(tag, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TBLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
