"""What went wrong (or right) in a run, in plain words: pure functions from saved curves and metrics to findings.

Each finding has a severity, a title, a sentence or two of text and what to try next. Nothing here
trains or reads files; `report.py` loads a run folder and calls `diagnose(...)`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from cnnlab.analysis import failures, imbalance

MARGIN = 3.0
SEVERITIES = ("error", "warning", "ok", "info")  # the order findings are shown in


@dataclass
class Finding:
    severity: str  # error | warning | info | ok
    kind: str  # overfitting, dead_class, confusion, underfitting, divergence, duplicates, weak_class, ...
    title: str
    text: str
    next: str = ""  # what to try next
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _arr(history: dict, key: str) -> np.ndarray | None:
    v = history.get(key) if history else None
    if v is None or len(v) == 0:
        return None
    return np.asarray(v, dtype=np.float64)


def noise_level(x: np.ndarray, start: int = 0) -> float:
    """Robust std of epoch-to-epoch noise: residuals from a centred 5-point quadratic (Savitzky-Golay) fit,
    which follows smooth curvature, scaled to the noise (x 1/0.717 for white noise), median-based.
    Residuals before `start` (the steep first epochs) are ignored."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 5:
        return float(np.std(x))
    fit = np.convolve(x, np.array([-3, 12, 17, 12, -3]) / 35.0, mode="valid")  # centres 2 .. n-3
    res = np.abs(x[2:-2] - fit)[max(0, start - 2):]
    return 1.4826 * float(np.median(res if len(res) else np.abs(x[2:-2] - fit))) / 0.717


def smooth(x: np.ndarray, width: int = 3) -> np.ndarray:
    """Centred moving average; windows shrink at the ends (so the ends are not pulled towards zero)."""
    x = np.asarray(x, dtype=np.float64)
    h = width // 2
    return np.array([x[max(0, i - h): i + h + 1].mean() for i in range(len(x))])


# ----------------------------------------------------------------------------------------------
# Overfitting


def overfitting_onset(history: dict, *, min_after: int = 2) -> dict | None:
    """The epoch from which the model overfits, or None.

    Definition. Let v be the validation loss per epoch, t the training loss, g = v - t the gap.
      1. The onset candidate is the epoch of lowest v (the checkpoint that `train.monitor: val_loss`
         would keep).
      2. It counts as overfitting only when there are >= `min_after` epochs after it and, with
         margin = max(3 sigma, 2% of v[onset]) where sigma is the epoch-to-epoch noise of v (`noise_level`:
         residuals from a local quadratic fit, skipping the steep first epochs),
         (a) v rises beyond noise: the mean of the last (up to 3) epochs exceeds the 3-epoch mean around
             the onset by > margin,
             and it is a trend, not one noisy epoch: either a least-squares line fitted to v from the
             onset on rises by > margin, or v never comes back: every epoch from onset + 2 on stays
             above v[onset] + margin (the jump-then-plateau shape of a model that memorised its data);
         (b) the gap keeps widening: its least-squares slope after the onset is positive and its
             mean over the last epochs exceeds g[onset] by > margin;
         (c) the training loss has not risen (rising training loss is instability, not overfitting).
    Returns {"epoch", "index", "val_loss", "val_loss_end", "gap_onset", "gap_end", "train_loss_onset",
    "train_loss_end"} with 1-based epochs as in history.csv.
    """
    v, t = _arr(history, "val_loss"), _arr(history, "train_loss")
    if v is None or t is None or len(v) != len(t) or len(v) < min_after + 2:
        return None
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(t))):
        return None
    epochs = _arr(history, "epoch")
    epochs = epochs.astype(int) if epochs is not None else np.arange(1, len(v) + 1)
    n = len(v)
    k = int(np.argmin(v))
    after = n - 1 - k
    if after < min_after:
        return None
    sv = smooth(v)
    noise = noise_level(v, start=k // 2)
    tail = min(3, after)
    g = v - t
    v_end, g_end, t_end = v[-tail:].mean(), g[-tail:].mean(), t[-tail:].mean()
    margin = max(MARGIN * noise, 0.02 * abs(v[k]), 1e-6)
    x = np.arange(after + 1)
    v_slope, gap_slope = np.polyfit(x, v[k:], 1)[0], np.polyfit(x, g[k:], 1)[0]
    # measured from the 3-epoch mean around the minimum, not the minimum itself, which is biased low by noise
    stays_up = after >= 2 and bool(np.all(v[k + 2:] > v[k] + margin))
    rises = v_end - sv[k] > margin and (v_slope * after > margin or stays_up)
    widens = gap_slope > 0 and g_end - g[k] > margin
    train_ok = t_end <= t[k] + max(noise, 1e-6)
    if not (rises and widens and train_ok):
        return None
    return {"epoch": int(epochs[k]), "index": k, "val_loss": float(v[k]), "val_loss_end": float(v[-1]),
            "gap_onset": float(g[k]), "gap_end": float(g[-1]), "train_loss_onset": float(t[k]),
            "train_loss_end": float(t[-1])}


def _overfitting(history: dict, best_epoch: int | None) -> list[Finding]:
    o = overfitting_onset(history)
    if o is None:
        return []
    text = (f"Validation loss was lowest at epoch {o['epoch']} ({o['val_loss']:.3f}) and rose to "
            f"{o['val_loss_end']:.3f} by the last epoch, while training loss kept falling "
            f"({o['train_loss_onset']:.3f} → {o['train_loss_end']:.3f}): from epoch {o['epoch']} on the model "
            f"memorises the training images rather than learning what generalises. The gap between "
            f"validation and training loss grew from {o['gap_onset']:.3f} to {o['gap_end']:.3f}.")
    if best_epoch is not None and best_epoch > o["epoch"]:
        text += (f" The evaluated checkpoint (epoch {best_epoch}) lies after the onset; monitoring the validation "
                 f"loss would have kept epoch {o['epoch']}.")
    elif best_epoch is not None:
        text += f" The evaluated checkpoint is the one from epoch {best_epoch}, before the damage."
    return [Finding("warning", "overfitting", f"Overfitting from epoch {o['epoch']}", text,
                    "Stop earlier (train.early_stop.patience: 3, or train.monitor: val_loss), add augmentation "
                    "(data.augment.hflip / crop_padding / cutout), weight decay (optim.weight_decay: 5e-4), "
                    "dropout, or more training data.", o)]


# ----------------------------------------------------------------------------------------------
# Classes: never predicted, confused, weak


def _names(summary: dict) -> list[str]:
    return [r["name"] for r in summary["per_class"]]


def _dead_classes(summary: dict, history: dict | None = None) -> list[Finding]:
    """Never-predicted classes as label-mapping bugs when the evidence is there (failures.unlearnt), else one
    'still learning' warning; almost-never-predicted classes."""
    cm = np.asarray(summary["confusion"])
    names = _names(summary)
    support, predicted = cm.sum(1), cm.sum(0)
    young = failures.unlearnt(summary, history)
    out = [failures.unlearnt_finding(young)] if young else []
    for i, name in enumerate(names):
        if support[i] == 0:
            continue
        row = cm[i].copy()
        row[i] = -1
        j = int(np.argmax(row))
        went = (f"its {support[i]} images went to other classes, most often '{names[j]}' ({cm[i, j]})"
                if cm[i, j] > 0 else f"it has {support[i]} images")
        if young and i in young["indices"]:
            continue
        if predicted[i] == 0:
            others = [cm[j, j] / support[j] for j in range(len(names)) if j != i and support[j]]
            went += (f"; the other classes are learnt ({_pct(float(np.mean(others)))} of their images right on "
                     "average)" if others else "")
            out.append(Finding(
                "error", "dead_class", f"Class '{name}' is never predicted",
                f"No image of the evaluated split is labelled '{name}' by the model; {went}. A class that is "
                "never predicted (a column of zeros in the confusion matrix) is the classic sign of a "
                "label-mapping bug: labels shifted by one, a class folder mapped to the wrong index, or a class "
                "missing from the training split.",
                "Check that the training labels of this class are right (data.json counts per split, the class "
                "order in data.json against the folder names) and look at the confusion matrix column.",
                {"class": name, "index": i, "support": int(support[i]), "predicted_as": names[j]}))
        elif support[i] >= 10 and predicted[i] <= 0.1 * support[i]:
            out.append(Finding(
                "warning", "rare_class", f"Class '{name}' is almost never predicted",
                f"The model labels only {predicted[i]} images '{name}' although {support[i]} are; {went}.",
                "Check this class's labels and its share of the training set (the Per-class table's train images); "
                f"when it is rare, try {imbalance.KEYS}.", {"class": name, "index": i, "support": int(support[i]),
                                          "predicted": int(predicted[i])}))
    return out


def confused_pairs(summary: dict, top: int = 5) -> list[dict]:
    """The largest off-diagonal cells: {"true", "pred", "count", "share"} (share of the true class's images)."""
    cm = np.asarray(summary["confusion"])
    names = _names(summary)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    rows = cm.sum(1)
    out = []
    for f in flat:
        i, j = divmod(int(f), cm.shape[1])
        if off[i, j] == 0:
            break
        out.append({"true": names[i], "pred": names[j], "count": int(off[i, j]),
                    "share": float(off[i, j] / rows[i]) if rows[i] else 0.0})
    return out


def _confusions(summary: dict) -> list[Finding]:
    pairs = confused_pairs(summary, top=3)
    if not pairs:
        return []
    parts = [f"'{p['true']}' → '{p['pred']}' ({p['count']}, {_pct(p['share'])} of '{p['true']}')" for p in pairs]
    worst = max(p["share"] for p in pairs)
    sev = "warning" if worst >= 0.3 else "info"
    return [Finding(sev, "confusion", "Most confused classes",
                    "The most frequent mistakes (true → predicted): " + "; ".join(parts) + ".",
                    "Look at these pairs in the failure gallery: similar-looking classes need more capacity or "
                    "resolution; mislabelled images need cleaning.", {"pairs": pairs})]


def _weak_classes(summary: dict, skip: set[int]) -> list[Finding]:
    """Classes far below the others: an outlier (under the median of the others by more than 20 points and 3
    robust spreads), or under half the others' median recall with its own 95% Wilson interval below that
    median (a class at 18% among classes at 40-50% after an epoch)."""
    from cnnlab.analysis.stats import proportion_ci

    acc = np.array([r["accuracy"] for r in summary["per_class"]])
    sup = np.array([r["support"] for r in summary["per_class"]])
    names = _names(summary)
    cm = np.asarray(summary["confusion"])
    ok = sup >= 5
    out = []
    if ok.sum() < 3:
        return out
    for i in np.argsort(acc):
        if not ok[i] or i in skip:
            continue
        others = acc[ok & (np.arange(len(acc)) != i)]
        med = float(np.median(others))
        spread = 1.4826 * float(np.median(np.abs(others - med)))
        outlier = acc[i] < med - max(0.2, 3 * spread)
        halved = acc[i] < 0.5 * med and proportion_ci(round(acc[i] * sup[i]), int(sup[i]))[1] < med
        if not (outlier or halved):
            break  # sorted ascending: no weaker class below
        row = cm[i].copy()
        row[i] = -1
        j = int(np.argmax(row))
        out.append(Finding(
            "warning", "weak_class", f"Class '{names[i]}' is much harder than the rest",
            f"Only {_pct(acc[i])} of '{names[i]}' images are classified correctly, against a median of {_pct(med)} "
            f"for the other classes; it is most often mistaken for '{names[j]}' ({_pct(cm[i, j] / sup[i])}).",
            "Look at this class in the failure gallery and the Grad-CAM maps: check its labels, how many training "
            "images it has, and whether it needs more resolution or augmentation.",
            {"class": names[i], "accuracy": float(acc[i]), "median_others": med}))
        if len(out) >= 3:
            break
    return out


# ----------------------------------------------------------------------------------------------
# Training dynamics


def _underfitting(history: dict, num_classes: int) -> list[Finding]:
    tl, ta, va = _arr(history, "train_loss"), _arr(history, "train_acc"), _arr(history, "val_acc")
    out = []
    if tl is None or len(tl) < 1 or not np.all(np.isfinite(tl)):
        return out
    drop = (tl[0] - tl.min()) / abs(tl[0]) if tl[0] else 0.0
    chance = 1.0 / max(num_classes, 1)
    best_train = float(np.nanmax(ta)) if ta is not None else None
    if len(tl) >= 3 and drop < 0.1:
        out.append(Finding(
            "warning", "underfitting", "Training loss barely falls",
            f"The training loss fell by only {_pct(drop)} over {len(tl)} epoch{'' if len(tl) == 1 else 's'} ({tl[0]:.3f} → {tl[-1]:.3f}; "
            f"chance level for {num_classes} classes is ln {num_classes} = {math.log(max(num_classes, 2)):.3f}). "
            "The model is not learning.",
            "Try a learning rate 3-10x larger (or smaller, if the loss jumps about), check that inputs are "
            "normalised and labels are right, and overfit a single batch first (train.limit_batches: 1).",
            {"drop": float(drop)}))
    elif best_train is not None and best_train < max(0.6, 2 * chance) and (va is None or best_train <= np.nanmax(va) + 0.05):
        out.append(Finding(
            "warning", "underfitting", "Underfitting: low training accuracy",
            f"Training accuracy never passed {_pct(best_train)}"
            + (f" in its {len(tl)} epoch{'' if len(tl) == 1 else 's'}" if len(tl) < 5 else "")
            + ", and validation accuracy is as high: the model cannot yet fit even the training images.",
            "Train longer, use a larger model or a higher learning rate, or reduce regularisation "
            "(dropout, weight decay, heavy augmentation).", {"best_train_acc": best_train}))
    if va is not None and len(va) >= 3 and np.all(np.isfinite(va)) and int(np.argmax(va)) == len(va) - 1 \
            and va[-1] - va[-3] > 0.005:
        out.append(Finding(
            "info", "still_improving", "Still improving when training stopped",
            f"Validation accuracy was still rising at the last epoch ({_pct(va[-3])} → {_pct(va[-1])} over the "
            "last two epochs).", "More epochs will probably help (train.epochs).", {}))
    return out


def divergence(steps: dict | None, history: dict | None = None) -> dict | None:
    """Where the training loss became non-finite or exploded, or None.

    Exploded = a logged step loss above 3x the median of the first five logged losses (after those five).
    """
    src = steps if steps and _arr(steps, "loss") is not None else None
    loss = _arr(src, "loss") if src else _arr(history or {}, "train_loss")
    if loss is None or len(loss) == 0:
        return None
    where = _arr(src, "step") if src else _arr(history, "epoch")
    where = where if where is not None else np.arange(len(loss))
    lr = _arr(src or history or {}, "lr")
    unit = "step" if src else "epoch"
    bad = ~np.isfinite(loss)
    head = loss[: min(5, len(loss))]
    ref = float(np.median(head[np.isfinite(head)])) if np.isfinite(head).any() else float("nan")
    big = np.zeros_like(bad)
    if ref > 0:
        big[len(head):] = np.nan_to_num(loss[len(head):], nan=0.0, posinf=0.0, neginf=0.0) > 3 * ref
    if not (bad | big).any():
        return None
    i = int(np.argmax(bad | big))  # whichever comes first
    out = {"kind": "non-finite" if bad[i] else "exploding", "unit": unit, "at": int(where[i]),
           "loss": str(loss[i]) if bad[i] else float(loss[i]), "lr": float(lr[i]) if lr is not None else None}
    if big[i]:
        out["start"] = ref
    return out


def _divergence(steps: dict | None, history: dict | None) -> list[Finding]:
    d = divergence(steps, history)
    if d is None:
        return []
    lr = f" (learning rate {d['lr']:.3g})" if d.get("lr") is not None else ""
    if d["kind"] == "non-finite":
        text = f"The training loss became {d['loss']} at {d['unit']} {d['at']}{lr}: training diverged."
    else:
        text = (f"The training loss exploded to {d['loss']:.3g} at {d['unit']} {d['at']}{lr}, more than 3x its "
                f"starting value ({d['start']:.3g}): the learning rate is too high for this model.")
    return [Finding("error", "divergence", "The loss diverges", text,
                    "Lower optim.lr by 3-10x, add warm-up (schedule.warmup_epochs: 1) or batchnorm, and check "
                    "the inputs for extreme values.", d)]


# ----------------------------------------------------------------------------------------------
# Data and calibration


def _data(data_info: dict | None) -> list[Finding]:
    findings = (data_info or {}).get("findings") or []
    out = []
    dups = [f for f in findings if f.get("kind") == "duplicate_across_splits"]
    if dups:
        shown = "; ".join(str(f.get("message", "")) for f in dups[:3])
        more = f" (and {len(dups) - 3} more)" if len(dups) > 3 else ""
        out.append(Finding(
            "warning", "duplicates", f"{len(dups)} duplicate image(s) across splits",
            f"The data checks found images that appear in more than one split: {shown}{more}. "
            "Duplicates between training and test images inflate the test accuracy.",
            "Remove the duplicates from the evaluation split (or deduplicate before splitting) and re-run.",
            {"count": len(dups)}))
    rest = [f for f in findings if f.get("kind") != "duplicate_across_splits"
            and f.get("severity") in ("error", "warning")]
    if rest:
        shown = "; ".join(f"{f.get('kind', '?')}: {f.get('message', '')}" for f in rest[:4])
        more = f" (and {len(rest) - 4} more)" if len(rest) > 4 else ""
        out.append(Finding("warning", "data_check", f"{len(rest)} data-check finding(s)", shown + more,
                           "See the Data section for the full list.", {"count": len(rest)}))
    return out


def _calibration(summary: dict) -> list[Finding]:
    ece = summary.get("ece")
    if ece is None or ece < 0.1:
        return []
    return [Finding("info", "calibration", f"Confidence is poorly calibrated (ECE {ece:.3f})",
                    f"On average the model's confidence and its accuracy differ by {_pct(ece)} (expected "
                    "calibration error over 15 bins); see the reliability diagram.",
                    "If probabilities matter, fit a temperature on the validation split (train.calibrate: true, "
                    "or cnnlab calibrate RUN), or try label smoothing (train.label_smoothing: 0.1).", {"ece": ece})]


def flagged_classes(findings) -> set[str]:
    """The class names the findings single out (never or rarely predicted, weak, not yet learnt)."""
    out = set()
    for f in findings:
        if f.kind in ("dead_class", "weak_class", "rare_class"):
            out.add(f.data.get("class"))
        elif f.kind == "unlearnt_classes":
            out.update(f.data.get("classes", []))
    return out


# ----------------------------------------------------------------------------------------------


def diagnose(history: dict | None, summary: dict | None, *, steps: dict | None = None,
             data_info: dict | None = None, best_epoch: int | None = None, grads: dict | None = None,
             config: dict | None = None) -> list[Finding]:
    """All findings for a run, most severe first.

    history / steps / grads: columns of history.csv / steps.csv / grads.csv as {name: sequence};
    summary: metrics.summary(...); config: config.yaml as a mapping (which settings the run used).
    """
    out: list[Finding] = []
    out += _divergence(steps, history)
    if history:
        out += _overfitting(history, best_epoch)
        out += _underfitting(history, len(summary["per_class"]) if summary else 2)
    out += failures.gradient_findings(grads)
    collapsed = failures.collapse(summary, history) if summary else None
    if collapsed:  # per-class findings would blame the labels for a training failure
        out.append(failures.collapse_finding(collapsed, grads))
        out += _calibration(summary)
    elif summary:
        dead = _dead_classes(summary, history)
        out += dead
        out += _weak_classes(summary, {i for f in dead for i in f.data.get("indices") or [f.data["index"]]})
        out += _confusions(summary)
        out += _calibration(summary)
    out += imbalance.findings(summary, data_info, config)
    out += _data(data_info)
    if not any(f.severity in ("error", "warning") for f in out):
        out.insert(0, Finding("ok", "healthy", "No problems found",
                              "No divergence, overfitting, underfitting, dead or weak classes or leaked duplicates "
                              "were detected.", ""))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(out, key=lambda f: order.get(f.severity, 9))
