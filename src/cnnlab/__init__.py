"""cnnlab: train, compare and explain image-classification CNNs from one YAML file."""
from __future__ import annotations

__version__ = "0.1.0"


def train(config, overrides=None, *, resume=None, quiet: bool = False):
    """Train a config (a YAML path, dict or Config) with dotted overrides; returns the `Run`.

    A config with `variations:` or `grid:` runs a whole study and returns the `Study`.
    """
    from cnnlab import config as C
    from cnnlab.training import experiment

    cfg = C.load(config, overrides)
    if resume is not None:
        from pathlib import Path

        from cnnlab.rundir import RunDir

        cfg = RunDir(resume).load_config(overrides)
        return experiment.run(cfg, resume_dir=Path(resume), quiet=quiet)
    if cfg.variations or cfg.grid or cfg.repeats > 1:
        from cnnlab.studies import study

        return study.run_study(cfg, quiet=quiet)
    return experiment.run(cfg, quiet=quiet)


__all__ = ["train", "__version__"]
