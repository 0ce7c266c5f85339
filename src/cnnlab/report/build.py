"""The report of a run, drawn only from the files in its folder (never retrains): plots/, failures.csv,
findings.json, report.html (one self-contained page) and report.md; plus TensorBoard scalars and the
`cnnlab report RUN_DIR` subcommand.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from cnnlab.analysis import diagnose as dg
from cnnlab.analysis.gradients import GRADS_FILE
from cnnlab.analysis import metrics as M
from cnnlab.errors import InputError
from cnnlab.training.tblog import TBLogger  # noqa: F401  (re-exported: report.TBLogger)

INT_COLS = {"epoch", "step", "index", "target", "pred"}
PLOTS = ("curves", "steps", "lr", "confusion_matrix", "confusion_normalized", "per_class", "reliability", "failures",
         "predictions", "filters", "feature_maps", "gradcam", "grad_norms")  # plots/<name>.png that build() owns
TEXT_COLS = {"id", "target_name", "pred_name"}


# ----------------------------------------------------------------------------------------------
# Reading a run folder (every file optional except what the caller needs)


class RunFileError(InputError, ValueError):
    """A file of a run folder that exists but cannot be read back (damaged, cut, edited by hand)."""


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV with numbers parsed ('nan'/'inf' kept as floats); [] when the file is missing.
    A damaged file (not UTF-8, a number column holding text) raises RunFileError naming it."""
    if not path.is_file():
        return []
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                out = {}
                for k, v in r.items():
                    if k is None:  # more cells than the header has columns
                        raise ValueError(f"row {len(rows) + 2} has more cells than the header")
                    if k in TEXT_COLS:
                        out[k] = v
                    elif v is None or v == "":  # a short (cut) row
                        out[k] = None if k in INT_COLS else float("nan")
                    elif k in INT_COLS:
                        out[k] = int(float(v))
                    else:
                        try:
                            out[k] = float(v)
                        except ValueError:
                            out[k] = v
                rows.append(out)
    except (UnicodeDecodeError, csv.Error, ValueError) as e:
        raise RunFileError(f"{path}: damaged, cannot be read back ({type(e).__name__}: {e}); restore it or "
                           "delete it") from None
    return rows


def read_json(path: Path) -> dict | None:
    """A run folder's JSON file as a dict; None when missing; RunFileError naming it when damaged."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFileError(f"{path}: damaged, not readable JSON ({type(e).__name__}: {e}); restore it or "
                           "delete it") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path}: damaged, expected a JSON object ({{...}}), found a {type(obj).__name__}")
    return obj


def columns(rows: list[dict]) -> dict:
    """Rows -> {column: list of values}."""
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


_json = read_json


def load_run(run_dir: str | Path) -> dict:
    """Everything the report needs from a run folder, as plain values; missing files give None / []."""
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {str(d)!r} does not exist")
    r: dict = {"dir": d, "name": d.name, "notes": []}
    r["config_text"] = (d / "config.yaml").read_text(encoding="utf-8") if (d / "config.yaml").is_file() else None
    r["cfg"] = None
    if r["config_text"] is not None:
        try:
            from cnnlab import config

            r["cfg"] = config.load(d / "config.yaml")
        except Exception as e:  # the report still shows what it can
            r["notes"].append(f"config.yaml could not be read back: {e}")
    for key in ("env", "data", "model", "metrics"):
        r[key] = _json(d / f"{key}.json" if key != "model" else d / "model.json")
    r["history"] = columns(read_csv(d / "history.csv"))
    r["steps"] = columns(read_csv(d / "steps.csv"))
    r["grads"] = columns(read_csv(d / GRADS_FILE))
    r["pred_rows"] = read_csv(d / "predictions.csv")
    r["logits"] = r["targets"] = r["images"] = r["sample_index"] = None
    if (d / "predictions.npz").is_file():
        with np.load(d / "predictions.npz") as z:
            r["logits"], r["targets"] = z["logits"], z["targets"]
    if (d / "samples.npz").is_file():
        with np.load(d / "samples.npz") as z:
            r["images"], r["sample_index"] = z["images"], z["index"]
    data = r["data"] or {}
    k = data.get("num_classes") or (r["logits"].shape[1] if r["logits"] is not None else 0)
    r["classes"] = list(data.get("classes") or [str(i) for i in range(k)])
    summ = (r["metrics"] or {}).get("test")
    if summ is None and r["logits"] is not None:  # metrics.json missing: the same numbers from the logits
        summ = M.summary(r["logits"], r["targets"], r["classes"])
    r["summary"] = summ
    if not r["pred_rows"] and r["logits"] is not None:
        r["pred_rows"] = _rows_from_logits(r["logits"], r["targets"], r["classes"])
    r["checkpoint"] = d / "checkpoints" / "best.pt" if (d / "checkpoints" / "best.pt").is_file() else None
    return r


def _rows_from_logits(logits, targets, classes) -> list[dict]:
    prob = M.softmax(logits)
    pred = prob.argmax(1)
    nll = -np.log(np.clip(prob[np.arange(len(targets)), targets], 1e-45, None))
    return [{"index": i, "id": str(i), "target": int(t), "target_name": classes[t], "pred": int(p),
             "pred_name": classes[p], "confidence": float(prob[i, p]), "loss": float(nll[i])}
            for i, (t, p) in enumerate(zip(targets, pred))]


def load_model(run: dict):
    """The best checkpoint's model, rebuilt from config.yaml and data.json; (model, None) or (None, why)."""
    if run["checkpoint"] is None:
        return None, "no checkpoints/best.pt"
    if run["cfg"] is None or not run["data"]:
        return None, "config.yaml or data.json missing"
    try:
        import torch

        from cnnlab.models import build_model

        d = run["data"]
        # the checkpoint holds every weight: no pretrained download is needed (or wanted) to rebuild
        mcfg = dataclasses.replace(run["cfg"].model, pretrained=None)
        model = build_model(mcfg, num_classes=d["num_classes"], in_channels=d["in_channels"], input_size=d["input_size"])
        state = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
        state = state["model"] if "model" in state else state
        for prefix in ("_orig_mod.", "module."):  # torch.compile / DistributedDataParallel wrappers
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        model.load_state_dict(state)
        return model.eval(), None
    except Exception as e:
        return None, f"could not rebuild the model from the checkpoint: {type(e).__name__}: {e}"


def normalise(images: np.ndarray, data: dict):
    """uint8 (N, C, H, W) -> float tensor normalised with data.json's mean/std."""
    import torch

    x = torch.from_numpy(np.asarray(images)).float() / 255.0
    mean = torch.tensor(data.get("mean") or [0.0] * x.shape[1]).view(1, -1, 1, 1)
    std = torch.tensor(data.get("std") or [1.0] * x.shape[1]).view(1, -1, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Building


def findings(run: dict) -> list[dg.Finding]:
    best = (run["metrics"] or {}).get("best_epoch")
    return dg.diagnose(run["history"] or None, run["summary"], steps=run["steps"] or None,
                       data_info=run["data"], best_epoch=best, grads=run.get("grads") or None)


def write_failures(run: dict, path: Path) -> int:
    """failures.csv: every misclassified sample of the evaluated split, highest loss first."""
    wrong = sorted((r for r in run["pred_rows"] if r["target"] != r["pred"]), key=lambda r: -r["loss"])
    cols = ["index", "id", "target", "target_name", "pred", "pred_name", "confidence", "loss"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(wrong)
    return len(wrong)


def make_plots(run: dict, found: list[dg.Finding], out: Path) -> dict[str, dict]:
    """Every figure the run's files allow, written to `out`; {key: {"path", "title", "caption"}}."""
    from cnnlab.report import plots as P

    figs: dict[str, dict] = {}

    def add(key, fig, title, caption, dpi=None):
        if fig is not None:
            figs[key] = {"path": P.save(fig, out / f"{key}.png", dpi=dpi), "title": title, "caption": caption}

    h, steps, summ = run["history"], run["steps"], run["summary"]
    onset = next((f.data["epoch"] for f in found if f.kind == "overfitting"), None)
    best = (run["metrics"] or {}).get("best_epoch")
    if h.get("epoch"):
        add("curves", P.curves(h, best_epoch=best, onset=onset), "Loss and accuracy per epoch",
            "Training (blue) and validation (orange); the star marks the best epoch"
            + (f", the red band the epochs after the overfitting onset (epoch {onset})." if onset else "."))
    div = next((f.data for f in found if f.kind == "divergence" and f.data.get("unit") == "step"), None)
    if steps.get("loss"):
        add("steps", P.step_loss(steps, diverged_at=div["at"] if div else None), "Training loss per step",
            "Every logged step, with a centred moving average when there are enough"
            + ("; the learning rate below." if steps.get("lr") else "."))
    elif steps.get("lr") or h.get("lr"):
        add("lr", P.learning_rate(steps or None, h), "Learning rate", "The schedule as applied.")
    if run.get("grads"):
        grad = next((f.data for f in found if f.kind in ("vanishing_gradients", "exploding_gradients")), None)
        add("grad_norms", P.grad_norms(run["grads"], verdict=grad["kind"] if grad else None),
            "Gradient norms by depth", "Each weight tensor's gradient norm (log scale), input side left, at "
            "logged steps from early (light) to late (dark)" + (f": {grad['kind']} gradients." if grad else "."))
    if summ:
        cm, k = summ["confusion"], len(run["classes"])
        dpi = 90 if k > 60 else None
        add("confusion_matrix", P.confusion(cm, run["classes"]), "Confusion matrix (counts)",
            "Rows are true classes, columns predicted; blank cells are zero.", dpi)
        add("confusion_normalized", P.confusion(cm, run["classes"], normalize=True),
            "Confusion matrix (share of each true class)",
            "Each row sums to 100%. Blue: classified right; red: mistaken for the column's class (own scale).", dpi)
        flagged = {f.data.get("class") for f in found if f.kind in ("dead_class", "weak_class", "rare_class")}
        add("per_class", P.per_class_accuracy(summ["per_class"], highlight=flagged), "Accuracy per class",
            "Share of each class's images classified right; red bars are flagged in the diagnostics.")
    if run["logits"] is not None:
        add("reliability", P.reliability(M.calibration_bins(run["logits"], run["targets"])),
            "Calibration", f"Expected calibration error {summ['ece']:.3f} (15 bins)." if summ else "")
    images, rows = _sample_rows(run)
    if images is not None:
        totals: dict = {}
        for r in run["pred_rows"]:
            if r["target"] != r["pred"]:
                key = (r["target_name"], r["pred_name"])
                totals[key] = totals.get(key, 0) + 1
        add("failures", P.failure_gallery(images, rows, totals), "Failures",
            "The misclassified images with the highest loss of each of the most frequent (true → predicted) pairs.")
        add("predictions", P.prediction_grid(images, rows), "Sample predictions",
            "Predicted class and confidence; green frame right, red frame wrong.")
    model, why = load_model(run)
    if model is None:
        run["notes"].append(f"Model figures omitted: {why}.")
    else:
        _model_plots(run, model, images, rows, add)
    return figs


def _sample_rows(run: dict):
    if run["images"] is None or not run["pred_rows"]:
        return None, []
    by_index = {r["index"]: r for r in run["pred_rows"]}
    keep = [i for i, ix in enumerate(run["sample_index"]) if int(ix) in by_index]
    return run["images"][keep], [by_index[int(run["sample_index"][i])] for i in keep]


def _model_plots(run: dict, model, images, rows, add) -> None:
    from cnnlab.report import plots_model as P

    add("filters", P.filters(model), "First-layer filters", "What the first convolution looks for.")
    if images is None or not len(images):
        return
    x = normalise(images, run["data"])
    first = next((i for i, r in enumerate(rows) if r["target"] == r["pred"]), 0)
    pick = run.get("pick") or {}
    if pick.get("image") is not None:  # `cnnlab report --image N`: an image of the evaluated split
        at = [i for i, r in enumerate(rows) if r["index"] == pick["image"]]
        if not at:
            raise ValueError(f"--image {pick['image']}: not among the images saved with the run (samples.npz); "
                             f"saved: {', '.join(str(r['index']) for r in rows[:40])}{', ...' if len(rows) > 40 else ''}")
        first = at[0]
    chans = pick.get("channels")
    add("feature_maps", P.feature_maps(model, x[first:first + 1], images[first], channels=chans or 8),
        "Feature maps", (f"Channels {', '.join(map(str, chans))}" if chans else "The most active channels")
        + f" of each conv stage for image {rows[first]['index']} (true '{rows[first]['target_name']}').")
    layer = P.cam_layer(model, x[:1])
    if layer is None:
        return
    right = [i for i, r in enumerate(rows) if r["target"] == r["pred"]][:4]
    wrong = [i for i, r in enumerate(rows) if r["target"] != r["pred"]][:4]
    pick = (right + wrong + [i for i in range(len(rows)) if i not in right + wrong])[:8]
    pick = sorted(pick[:8])
    maps, _ = P.gradcam(model, x[pick], layer[1])
    label = P.layer_label(model, layer[0])
    add("gradcam", P.gradcam_grid(images[pick], maps, [rows[i] for i in pick], label), "Grad-CAM",
        f"Target {label}, the last conv layer with a spatial output larger than 1x1, chosen "
        "automatically; red = strong evidence for the predicted class.")


def build(run_dir: str | Path, *, image: int | None = None, channels: list[int] | None = None) -> Path:
    """Write plots/, failures.csv, findings.json, report.html and report.md for a run; return report.html.
    `image` (an index of the evaluated split among the saved samples) and `channels` pick the feature maps."""
    from cnnlab.report import html as report_html
    from cnnlab.report import md as report_md

    require_run_dir(run_dir)  # the report deletes stale plots/*.png and rewrites report.*: only in a run folder
    run = load_run(run_dir)
    run["pick"] = {"image": image, "channels": channels}
    d = run["dir"]
    found = findings(run)
    (d / "findings.json").write_text(json.dumps([f.to_dict() for f in found], indent=1, default=_plain) + "\n",
                                     encoding="utf-8")
    n_fail = write_failures(run, d / "failures.csv") if run["pred_rows"] else 0
    figs = make_plots(run, found, d / "plots")
    for name in PLOTS:  # a figure this build could not draw must not survive from an earlier one
        if name not in figs and (d / "plots" / f"{name}.png").is_file():
            (d / "plots" / f"{name}.png").unlink()
    ctx = {"run": run, "findings": found, "figs": figs, "n_failures": n_fail}
    (d / "report.md").write_text(report_md.markdown(ctx), encoding="utf-8")
    path = d / "report.html"
    path.write_text(report_html.html(ctx), encoding="utf-8")
    return path


class NotARunError(InputError, ValueError):
    """`cnnlab report` pointed at a folder that is not a run folder (exit 2); nothing in it is touched."""


RUN_FILES = ("config.yaml", "history.csv", "metrics.json", "predictions.npz")  # what a report is drawn from


def require_run_dir(run_dir: str | Path) -> None:
    """Refuse a folder cnnlab did not make and that holds none of the files a report is drawn from."""
    from cnnlab.training.experiment import MARKER

    d = Path(run_dir)
    if d.is_dir() and not (d / MARKER).is_file() and not any((d / f).is_file() for f in RUN_FILES):
        raise NotARunError(f"{d}: not a run folder (none of {', '.join(RUN_FILES)} in it, and no {MARKER}); "
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
    run = load_run(run_dir)
    log_dir = Path(log_dir) if log_dir else run["dir"] / "tensorboard"
    with TBLogger(log_dir) as tb:
        if not tb.enabled:
            return None
        h = run["history"]
        for i, ep in enumerate(h.get("epoch", [])):
            tb.scalars({f"epoch/{k}": h[k][i] for k in h if k != "epoch"}, ep)
        s = run["steps"]
        for i, st in enumerate(s.get("step", [])):
            tb.scalars({"step/loss": s["loss"][i], "step/lr": s.get("lr", [None] * (i + 1))[i]}, st)
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
