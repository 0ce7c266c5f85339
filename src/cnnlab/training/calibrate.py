"""Temperature scaling of a trained run: T fitted on the validation split's logits of the best checkpoint
(analysis/calibration.py), recorded in calibration.json and as metrics.json's "calibration" (the evaluated
split's ECE and NLL before and after), so that `cnnlab.load` / `cnnlab predict` apply it and the report draws
the reliability diagram after it. At the end of training with `train.calibrate: true`, or later with
`cnnlab calibrate RUN` (its parser is here: `add_parser`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cnnlab import config as C
from cnnlab import rundir as R


def fit(cfg: C.Config, splits, weights: dict, device, eval_logits, eval_targets) -> dict:
    """The calibration record of `weights`: their validation logits (every rank evaluates, as in training),
    the temperature fitted on them, and ECE / NLL before and after on the validation and the evaluated split."""
    from cnnlab.analysis import calibration as cal
    from cnnlab.training import loop as T

    if splits.val is None or len(splits.val) == 0:
        raise C.ConfigError("train.calibrate: the run has no validation images to fit a temperature on "
                            f"(data.val_split={cfg.data.val_split!r}); hold some out (data.val_split: 0.1)")
    val = dataclasses.replace(splits, test=splits.val, eval_split="val")
    v_logits, v_targets = T.evaluate_weights(cfg, val, weights, device)
    temperature = cal.fit_temperature(v_logits.numpy(), v_targets.numpy())
    on_eval = cal.report(eval_logits.numpy(), eval_targets.numpy(), temperature)
    return {"temperature": temperature, "fitted_on": "val", "val": cal.report(v_logits.numpy(), v_targets.numpy(),
                                                                             temperature),
            "split": splits.eval_split, **{k: on_eval[k] for k in ("ece_before", "ece_after", "nll_before",
                                                                   "nll_after")},
            "same_split": splits.eval_split == "val"}  # fitted and measured on one split: optimistic


def save(run_dir: Path, record: dict, metrics: dict) -> None:
    """calibration.json, then metrics.json with its "calibration" block (both atomic)."""
    R.write_json(run_dir / R.CALIBRATION, record)
    metrics["calibration"] = {k: record[k] for k in ("temperature", "fitted_on", "split", "ece_before", "ece_after",
                                                     "nll_before", "nll_after")}
    R.write_json(run_dir / R.METRICS, metrics)


def calibrate_run(run_dir: str | Path, *, report: bool = True) -> dict:
    """`cnnlab calibrate RUN`: fit the temperature of a finished run's best checkpoint on its validation split
    (the run's own split and normalisation), record it, and redraw the report."""
    from cnnlab import process
    from cnnlab.data.pipeline import prepare
    from cnnlab.training import checkpoint as ckpt

    run = R.load_run(run_dir, finished=True)
    best = run.checkpoint("best")
    if best is None or run.logits is None or not run.data:
        raise FileNotFoundError(f"{run.dir}: needs {R.CHECKPOINTS}/{R.BEST}, {R.PREDICTIONS_NPZ} and {R.DATA} to "
                                "calibrate")
    cfg = C.replace(run.config, {"data.mean": run.data["mean"], "data.std": run.data["std"], "data.check": False})
    device = process.setup(cfg)
    splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
    import torch

    record = fit(cfg, splits, ckpt.load(best)["model"], device, torch.from_numpy(run.logits),
                 torch.from_numpy(run.targets))
    save(run.dir, record, dict(run.metrics))
    if report and cfg.output.report:
        from cnnlab.report import build

        build.build(run.dir)
    return record


def describe(record: dict) -> str:
    return (f"temperature {record['temperature']:.3f} (fitted on the validation split); {record['split']} ECE "
            f"{record['ece_before']:.4f} -> {record['ece_after']:.4f}, NLL {record['nll_before']:.4f} -> "
            f"{record['nll_after']:.4f}")


def _main(args) -> int:
    record = calibrate_run(args.run_dir, report=not args.no_report)
    print(f"{args.run_dir}: {describe(record)}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit a temperature on a run's validation split (calibrated "
                                                "confidences in predict, ECE before/after in metrics.json)")
    p.add_argument("run_dir", help="a finished run folder")
    p.add_argument("--no-report", action="store_true", help="do not redraw the report")
    p.set_defaults(func=_main)
