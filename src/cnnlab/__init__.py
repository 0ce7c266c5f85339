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


def load(run_dir, *, checkpoint: str = "best", device=None):
    """A finished run as a classifier: `.predict(x)` (paths, PIL images, arrays, tensors), `.predict_proba(x)`,
    `.model`, `.classes`, `.transform` (the run's own evaluation preprocessing)."""
    from cnnlab.deploy.classifier import load as _load

    return _load(run_dir, checkpoint=checkpoint, device=device)


def evaluate(run_dir, *, checkpoint: str = "best", **data_overrides) -> dict:
    """Re-evaluate a run's checkpoint, optionally on other data: `evaluate("runs/x", root="other.zip")`
    (keys of the data section). Classes are matched by name. Returns the metrics and the results folder."""
    from cnnlab.training.evaluate import evaluate_run

    return evaluate_run(run_dir, {f"data.{k}": v for k, v in data_overrides.items()}, which=checkpoint)


def compare(runs, *, out=None, baseline=None):
    """Compare run or study folders (tables, curves, significance tests); returns the study.html path."""
    from cnnlab.studies.report import compare as _compare

    return _compare(runs, out=out, baseline=baseline)


def export(run_dir, format: str = "onnx", out=None, *, dynamic_batch: bool = False, opset=None,
           checkpoint: str = "best", quiet: bool = False):
    """Export a run's model to ONNX or TorchScript with its metadata, verified against PyTorch; returns the path."""
    from cnnlab.deploy.export import export as _export

    return _export(run_dir, format, out, dynamic_batch=dynamic_batch, opset=opset, checkpoint=checkpoint,
                   say=(lambda *a: None) if quiet else print)


__all__ = ["train", "load", "evaluate", "compare", "export", "__version__"]
