"""The report of a run, drawn only from the files in its folder (never retrains): plots/, failures.csv,
findings.json, report.html (one self-contained page) and report.md; plus TensorBoard scalars and the
`cnnlab report RUN_DIR` subcommand (`add_parser`).

The folder is read through rundir.RunDir (`gather`); what the report shows is declared in sections.py,
drawn by figures.py and written by html.py and md.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cnnlab.analysis import diagnose as dg
from cnnlab.analysis import metrics as M
from cnnlab.errors import InputError
from cnnlab.training.tblog import TBLogger  # noqa: F401  (re-exported: report.TBLogger)

from cnnlab import rundir as R
from cnnlab.rundir import RunFileError, columns, read_csv, read_json  # noqa: F401  (re-exported: report.read_csv, ...)

from cnnlab.report import sections as S


# ----------------------------------------------------------------------------------------------
# Reading a run folder (through rundir.RunDir; every file optional except what the caller needs)


def gather(run_dir: str | Path) -> dict:
    """Everything the report needs from a run folder, as plain values; missing files give None / []."""
    rd = R.load_run(run_dir)
    d = rd.dir
    r: dict = {"dir": d, "name": d.name, "notes": [], "rundir": rd}
    r["config_text"] = rd.config_text
    r["cfg"] = None
    if r["config_text"] is not None:
        try:
            r["cfg"] = rd.config
        except Exception as e:  # the report still shows what it can
            r["notes"].append(f"{R.CONFIG} could not be read back: {e}")
    r["env"], r["data"], r["model"], r["metrics"] = rd.env, rd.data, rd.model_info, rd.metrics
    r["history"] = rd.history_columns
    r["steps"] = columns(rd.steps)
    r["grads"] = columns(read_csv(d / R.GRADS))
    r["pred_rows"] = rd.predictions
    r["logits"], r["targets"] = rd.logits, rd.targets
    r["images"], r["sample_index"] = rd.samples
    r["gallery"] = rd.gallery
    data = r["data"] or {}
    k = data.get("num_classes") or (r["logits"].shape[1] if r["logits"] is not None else 0)
    r["classes"] = list(data.get("classes") or [str(i) for i in range(k)])
    summ = (r["metrics"] or {}).get("test")
    if summ is None and r["logits"] is not None:  # metrics.json missing: the same numbers from the logits
        summ = M.summary(r["logits"], r["targets"], r["classes"])
    r["summary"] = summ
    if not r["pred_rows"] and r["logits"] is not None:
        r["pred_rows"] = _rows_from_logits(r["logits"], r["targets"], r["classes"])
    r["checkpoint"] = rd.checkpoint("best")
    r["calibration"] = rd.calibration
    r["lr_find"] = read_json(d / R.LR_FIND_JSON)  # optim.lr: auto: the range test's choice and its curve
    r["lr_curve"] = columns(read_csv(d / R.LR_FIND_CSV)) if r["lr_find"] else {}
    return r


def _rows_from_logits(logits, targets, classes) -> list[dict]:
    prob = M.softmax(logits)
    pred = prob.argmax(1)
    nll = -np.log(np.clip(prob[np.arange(len(targets)), targets], 1e-45, None))
    return [{"index": i, "id": str(i), "target": int(t), "target_name": classes[t], "pred": int(p),
             "pred_name": classes[p], "confidence": float(prob[i, p]), "loss": float(nll[i])}
            for i, (t, p) in enumerate(zip(targets, pred))]


# ----------------------------------------------------------------------------------------------
# Building


def findings(run: dict) -> list[dg.Finding]:
    best = (run["metrics"] or {}).get("best_epoch")
    return dg.diagnose(run["history"] or None, run["summary"], steps=run["steps"] or None,
                       data_info=run["data"], best_epoch=best, grads=run.get("grads") or None,
                       config=run["rundir"].config_dict if run.get("rundir") is not None else None)


def write_failures(run: dict, path: Path) -> int:
    """failures.csv: every misclassified sample of the evaluated split, highest loss first."""
    wrong = sorted((r for r in run["pred_rows"] if r["target"] != r["pred"]), key=lambda r: -r["loss"])
    R.write_csv(path, R.PREDICTION_COLS, wrong)
    return len(wrong)


def make_plots(run: dict, found: list[dg.Finding], out: Path, sections=None) -> dict[str, dict]:
    """Every figure of the report's sections that the run's files allow, written to `out`;
    {key: {"path", "title", "caption"}}."""
    from cnnlab.report import plots as P
    from cnnlab.report.figures import Drawing

    drawing, figs = Drawing(run, found), {}
    for f in S.figures_of(S.SECTIONS if sections is None else sections):
        drawn = f.draw(drawing)
        if drawn is not None and drawn.fig is not None:
            figs[f.key] = {"path": P.save(drawn.fig, out / f"{f.key}.png", dpi=drawn.dpi), "title": f.title,
                           "caption": drawn.caption}
    return figs


def build(run_dir: str | Path, *, sections: list | None = None, image: int | None = None,
          channels: list[int] | None = None) -> Path:
    """Write plots/, failures.csv, findings.json, report.html and report.md for a run; return report.html.
    `sections`: the report's sections (default sections.SECTIONS, the page order); `image` (an index of the
    evaluated split among the saved samples) and `channels` pick the feature maps."""
    from cnnlab.report import html as report_html
    from cnnlab.report import md as report_md

    sections = S.SECTIONS if sections is None else sections
    require_run_dir(run_dir)  # the report deletes stale plots/*.png and rewrites report.*: only in a run folder
    run = gather(run_dir)
    run["pick"] = {"image": image, "channels": channels}
    d = run["dir"]
    found = findings(run)
    R.write_text(d / R.FINDINGS, json.dumps([f.to_dict() for f in found], indent=1, default=_plain) + "\n")
    n_fail = write_failures(run, d / R.FAILURES) if run["pred_rows"] else 0
    figs = make_plots(run, found, d / R.PLOTS, sections)
    for f in S.figures_of(sections):  # a figure this build could not draw must not survive from an earlier one
        if f.key not in figs and (d / R.PLOTS / f"{f.key}.png").is_file():
            (d / R.PLOTS / f"{f.key}.png").unlink()
    ctx = {"run": run, "findings": found, "figs": figs, "n_failures": n_fail}
    R.write_text(d / R.REPORT_MD, report_md.markdown(ctx, sections))
    path = d / R.REPORT_HTML
    R.write_text(path, report_html.html(ctx, sections))
    return path


class NotARunError(InputError, ValueError):
    """`cnnlab report` pointed at a folder that is not a run folder (exit 2); nothing in it is touched."""


RUN_FILES = (R.CONFIG, R.HISTORY, R.METRICS, R.PREDICTIONS_NPZ)  # what a report is drawn from


def require_run_dir(run_dir: str | Path) -> None:
    """Refuse a folder cnnlab did not make and that holds none of the files a report is drawn from."""
    d = Path(run_dir)
    if d.is_dir() and not R.made_by_cnnlab(d) and not any((d / f).is_file() for f in RUN_FILES):
        raise NotARunError(f"{d}: not a run folder (none of {', '.join(RUN_FILES)} in it, and no {R.MARKER}); "
                           "a report is written only into the run folder it describes, and nothing here was changed")


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v) if math.isfinite(v) else str(v)
    return str(v)


# ----------------------------------------------------------------------------------------------
# TensorBoard


def write_tensorboard(run_dir: str | Path, log_dir: str | Path | None = None) -> Path | None:
    """Replay history.csv, steps.csv and the test metrics into TensorBoard files (default RUN/tensorboard)."""
    run = gather(run_dir)
    log_dir = Path(log_dir) if log_dir else run["dir"] / R.TENSORBOARD
    with TBLogger(log_dir) as tb:
        if not tb.enabled:
            return None
        h = run["history"]
        for i, ep in enumerate(h.get("epoch", [])):
            tb.scalars({f"epoch/{k}": h[k][i] for k in h if k != "epoch"}, ep)
        s = run["steps"]
        for i, st in enumerate(s.get("step", [])):
            tb.scalars({f"step/{k}": s[k][i] for k in ("loss", "acc", "lr") if k in s}, st)
        summ = run["summary"]
        if summ:
            last = int(h["epoch"][-1]) if h.get("epoch") else 0
            tb.scalars({f"test/{k}": summ[k] for k in ("accuracy", "loss", "ece", "top5") if summ.get(k) is not None},
                       last)
    return log_dir


# ----------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers) -> None:
    """Add `report RUN_DIR` to an argparse subparsers object (sets `func`, returning an exit code)."""
    p = subparsers.add_parser("report", help="redraw plots and report.html of a run from its saved files",
                              description="Regenerate plots/, failures.csv, report.html and report.md of a run "
                                          "folder from its saved files (no training).")
    p.add_argument("run_dir", help="the run folder (runs/<name>)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    p.add_argument("--image", type=int, metavar="N", help="feature maps of this image (its index in the evaluated "
                   "split, among the samples saved with the run)")
    p.add_argument("--channels", metavar="C[,C]", help="feature-map channels to show, e.g. 0,5,9 (default: the 8 "
                   "most active of each stage)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    chans = None
    if args.channels:
        try:
            chans = [int(c) for c in args.channels.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--channels {args.channels!r}: expected channel numbers, e.g. 0,5,9") from None
    path = build(args.run_dir, image=args.image, channels=chans)  # a missing run folder: FileNotFoundError, exit 2
    print(f"report: {path}")
    if getattr(args, "tensorboard", False):
        tb = write_tensorboard(args.run_dir)
        print(f"tensorboard: {tb}" if tb else "tensorboard: not installed, skipped")
    return 0
