"""cnnlab: train, compare and explain image-classification CNNs from one YAML file."""
from __future__ import annotations

__version__ = "0.1.0"


def train(config, overrides=None, *, resume=None, quiet: bool = False):
    """Train a config (a YAML path, dict or Config) with dotted overrides; returns the `Run`.

    A config with `variations:` or `grid:` runs a whole study and returns the `Study`.
    """
    from cnnlab import config as C
    from cnnlab import process
    from cnnlab.training import experiment

    cfg = C.load(config, overrides)
    if resume is not None:
        from pathlib import Path

        cfg = C.load(Path(resume) / "config.yaml", overrides)
        return experiment.run(cfg, device=process.setup(cfg), resume_dir=Path(resume), quiet=quiet)
    if cfg.variations or cfg.grid or cfg.repeats > 1:
        from cnnlab.studies import study

        return study.run_study(cfg, quiet=quiet)  # sets up the process for each run
    return experiment.run(cfg, device=process.setup(cfg), quiet=quiet)


__all__ = ["train", "__version__"]
