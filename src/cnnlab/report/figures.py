"""The run report's figures: one draw function per figure, each a function of the run's saved files (a
`Drawing`) returning `Drawn(figure, caption)` or None when the files do not allow it. sections.py says which
section shows which figure under which title; build.py draws them all into plots/.

Imports plots.py / plots_images.py / plots_model.py (matplotlib, torch) only inside the draw functions."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from cnnlab import rundir as R
from cnnlab.analysis import diagnose as dg
from cnnlab.analysis import metrics as M


class Drawn(NamedTuple):
    fig: Any  # a matplotlib Figure
    caption: str
    dpi: int | None = None


@dataclass
class Drawing:
    """What the draw functions share: the gathered run, its findings, and values computed once (the sample
    images with their prediction rows, the rebuilt model) on first use."""

    run: dict
    findings: list[dg.Finding]

    def finding(self, kind: str, **match) -> dict | None:
        return next((f.data for f in self.findings if f.kind == kind
                     and all(f.data.get(k) == v for k, v in match.items())), None)

    @property
    def best_epoch(self):
        return (self.run["metrics"] or {}).get("best_epoch")

    @cached_property
    def samples(self):
        """(images (N, C, H, W) uint8, their predictions.csv rows), or (None, [])."""
        run = self.run
        if run["images"] is None or not run["pred_rows"]:
            return None, []
        by_index = {r["index"]: r for r in run["pred_rows"]}
        keep = [i for i, ix in enumerate(run["sample_index"]) if int(ix) in by_index]
        return run["images"][keep], [by_index[int(run["sample_index"][i])] for i in keep]

    @cached_property
    def model(self):
        """The best checkpoint's model, or None (with a note in the report saying why)."""
        model, why = load_model(self.run)
        if model is None:
            self.run["notes"].append(f"Model figures omitted: {why}.")
        return model

    @cached_property
    def x(self):
        """The sample images normalised as the model saw them."""
        return normalise(self.samples[0], self.run["data"])


def load_model(run: dict):
    """The best checkpoint's model (RunDir.load_model); (model, None) or (None, why)."""
    if run["checkpoint"] is None:
        return None, f"no {R.CHECKPOINTS}/{R.BEST}"
    if run["cfg"] is None or not run["data"]:
        return None, f"{R.CONFIG} or {R.DATA} missing"
    try:
        return run["rundir"].load_model("best"), None
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
# The data


def data_gallery(d: Drawing):
    from cnnlab.report import plots_images as P

    g = d.run.get("gallery")
    if g is None or not len(g[0]):
        return None
    images, labels, _ = g
    classes = d.run["classes"]
    shown = len(set(labels.tolist()))
    per = max(int((labels == c).sum()) for c in set(labels.tolist()))
    return Drawn(P.data_gallery(images, labels, classes),
                 f"{per} training image{'s' if per > 1 else ''} of each class, picked at random (seeded), as the "
                 "model reads them before normalisation and augmentation"
                 + (f"; the first {shown} of {len(classes)} classes." if shown < len(classes) else "."))


# ----------------------------------------------------------------------------------------------
# Training


def curves(d: Drawing):
    from cnnlab.report import plots as P

    h = d.run["history"]
    if not h.get("epoch"):
        return None
    onset = (d.finding("overfitting") or {}).get("epoch")
    return Drawn(P.curves(h, best_epoch=d.best_epoch, onset=onset),
                 "Training (blue) and validation (orange); the star marks the best epoch"
                 + (f", the red band the epochs after the overfitting onset (epoch {onset})." if onset else "."))


def steps(d: Drawing):
    from cnnlab.report import plots as P

    s = d.run["steps"]
    if not s.get("loss"):
        return None
    div = d.finding("divergence", unit="step")
    return Drawn(P.step_loss(s, diverged_at=div["at"] if div else None),
                 "Every logged step, with a centred moving average when there are enough"
                 + ("; the learning rate below." if s.get("lr") else "."))


def grad_norms(d: Drawing):
    from cnnlab.report import plots as P

    if not d.run.get("grads"):
        return None
    grad = next((f.data for f in d.findings if f.kind in ("vanishing_gradients", "exploding_gradients")), None)
    return Drawn(P.grad_norms(d.run["grads"], verdict=grad["kind"] if grad else None),
                 "Each weight tensor's gradient norm (log scale), input side left, at logged steps from early "
                 "(light) to late (dark)" + (f": {grad['kind']} gradients." if grad else "."))


def learning_rate(d: Drawing):
    from cnnlab.report import plots as P

    s, h = d.run["steps"], d.run["history"]
    if s.get("loss") or not (s.get("lr") or h.get("lr")):  # the step figure already shows the schedule
        return None
    return Drawn(P.learning_rate(s or None, h), "The schedule as applied.")


def lr_find(d: Drawing):
    """`optim.lr: auto`: the range test's curve with the chosen rate (lr_find.csv, lr_find.json)."""
    from cnnlab.report import plots as P

    found, c = d.run.get("lr_find"), d.run.get("lr_curve") or {}
    if not found or not c.get("lr"):
        return None
    return Drawn(P.lr_find(c["lr"], c["loss"], c["smoothed"], suggestion=found.get("suggestion"),
                           lr_min=found.get("lr_min"), steepest=found.get("steepest")),
                 "Training loss against a learning rate growing exponentially, step by step; the run used the "
                 "suggestion, a tenth of the rate with the lowest smoothed loss.")


# ----------------------------------------------------------------------------------------------
# Results


def _confusion(d: Drawing, normalize: bool, caption: str):
    from cnnlab.report import plots as P

    summ = d.run["summary"]
    if not summ:
        return None
    classes = d.run["classes"]
    return Drawn(P.confusion(summ["confusion"], classes, normalize=normalize), caption,
                 90 if len(classes) > 60 else None)


def confusion_counts(d: Drawing):
    return _confusion(d, False, "Rows are true classes, columns predicted; blank cells are zero.")


def confusion_share(d: Drawing):
    return _confusion(d, True, "Each row sums to 100%. Blue: classified right; red: mistaken for the column's "
                               "class (own scale).")


def per_class(d: Drawing):
    from cnnlab.report import plots as P

    summ = d.run["summary"]
    if not summ:
        return None
    flagged = dg.flagged_classes(d.findings)
    return Drawn(P.per_class_accuracy(summ["per_class"], highlight=flagged),
                 "Share of each class's images classified right; red bars are flagged in the diagnostics.")


def reliability(d: Drawing):
    from cnnlab.report import plots as P

    run, summ = d.run, d.run["summary"]
    if run["logits"] is None:
        return None
    return Drawn(P.reliability(M.calibration_bins(run["logits"], run["targets"])),
                 f"Expected calibration error {summ['ece']:.3f} (15 bins)." if summ else "")


def reliability_calibrated(d: Drawing):
    from cnnlab.report import plots as P

    run, cal = d.run, d.run.get("calibration")
    if run["logits"] is None or not cal:
        return None
    t = float(cal["temperature"])
    ece = M.expected_calibration_error(run["logits"] / t, run["targets"])
    return Drawn(P.reliability(M.calibration_bins(run["logits"] / t, run["targets"])),
                 f"After temperature scaling (logits / {t:.3f}, fitted on the validation split): expected "
                 f"calibration error {ece:.3f}.")


def failures(d: Drawing):
    from cnnlab.report import plots_images as P

    images, rows = d.samples
    if images is None:
        return None
    totals: dict = {}
    for r in d.run["pred_rows"]:
        if r["target"] != r["pred"]:
            key = (r["target_name"], r["pred_name"])
            totals[key] = totals.get(key, 0) + 1
    return Drawn(P.failure_gallery(images, rows, totals),
                 "The misclassified images with the highest loss of each of the most frequent (true → predicted) pairs.")


def predictions(d: Drawing):
    from cnnlab.report import plots_images as P

    images, rows = d.samples
    if images is None:
        return None
    return Drawn(P.prediction_grid(images, rows), "Predicted class and confidence; green frame right, red frame wrong.")


# ----------------------------------------------------------------------------------------------
# Inside the model (the best checkpoint rebuilt)


def filters(d: Drawing):
    from cnnlab.report import plots_model as P

    if d.model is None:
        return None
    return Drawn(P.filters(d.model), "What the first convolution looks for.")


def feature_maps(d: Drawing):
    from cnnlab.report import plots_model as P

    images, rows = d.samples
    if d.model is None or images is None or not len(images):
        return None
    first = next((i for i, r in enumerate(rows) if r["target"] == r["pred"]), 0)
    pick = d.run.get("pick") or {}
    if pick.get("image") is not None:  # `cnnlab report --image N`: an image of the evaluated split
        at = [i for i, r in enumerate(rows) if r["index"] == pick["image"]]
        if not at:
            raise ValueError(f"--image {pick['image']}: not among the images saved with the run ({R.SAMPLES}); "
                             f"saved: {', '.join(str(r['index']) for r in rows[:40])}{', ...' if len(rows) > 40 else ''}")
        first = at[0]
    chans = pick.get("channels")
    return Drawn(P.feature_maps(d.model, d.x[first:first + 1], images[first], channels=chans or 8),
                 (f"Channels {', '.join(map(str, chans))}" if chans else "The most active channels")
                 + f" of each conv stage for image {rows[first]['index']} (true '{rows[first]['target_name']}').")


def gradcam(d: Drawing):
    from cnnlab.report import plots_model as P

    images, rows = d.samples
    if d.model is None or images is None or not len(images):
        return None
    layer = P.cam_layer(d.model, d.x[:1])
    if layer is None:
        return None
    right = [i for i, r in enumerate(rows) if r["target"] == r["pred"]][:4]
    wrong = [i for i, r in enumerate(rows) if r["target"] != r["pred"]][:4]
    pick = (right + wrong + [i for i in range(len(rows)) if i not in right + wrong])[:8]
    pick = sorted(pick[:8])
    maps, _ = P.gradcam(d.model, d.x[pick], layer[1])
    label = P.layer_label(d.model, layer[0])
    return Drawn(P.gradcam_grid(images[pick], maps, [rows[i] for i in pick], label),
                 f"Target {label}, the last conv layer with a spatial output larger than 1x1, chosen "
                 "automatically; red = strong evidence for the predicted class.")
