"""Classification metrics as pure numpy functions of (logits or predicted labels, targets, number of classes).

Conventions follow scikit-learn: confusion rows are true classes, columns predicted classes; a ratio
whose denominator is zero is 0 (sklearn's `zero_division` default, without the warnings).
"""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15


def _labels(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {y.shape}")
    return y.astype(np.int64, copy=False)


def _logits(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be a 2-D array (N, K), got shape {z.shape}")
    return z


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def softmax(logits) -> np.ndarray:
    """Row-wise softmax, stable for large logits. (N, K) -> (N, K)."""
    z = _logits(logits)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predictions(logits) -> np.ndarray:
    """Arg-max class of each row (the first one on ties, as torch and numpy do)."""
    return _logits(logits).argmax(axis=1).astype(np.int64)


def cross_entropy(logits, targets) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits), in nats."""
    z, y = _logits(logits), _labels(targets, "targets")
    if len(y) == 0:
        return float("nan")
    m = z.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(log_z - z[np.arange(len(y)), y]))


def confusion_matrix(targets, preds, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: entry [i, j] = samples of true class i predicted as j."""
    y, p = _labels(targets, "targets"), _labels(preds, "preds")
    if len(y) != len(p):
        raise ValueError(f"targets ({len(y)}) and preds ({len(p)}) differ in length")
    for name, a in (("targets", y), ("preds", p)):
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} hold a class index outside 0..{num_classes - 1}")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix.

    `accuracy` per class is the fraction of that class's samples classified correctly (= recall).
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    # sklearn: F1 = 2 tp / (2 tp + fp + fn), 0 where the denominator is 0
    f1 = _safe_div(2 * tp, support + predicted)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support,
            "predicted": predicted, "accuracy": recall.copy()}


def averages(cm: np.ndarray) -> dict[str, dict[str, float]]:
    """Macro (unweighted mean over classes) and weighted (by support) precision, recall and F1."""
    pc = per_class(cm)
    w = pc["support"].astype(np.float64)
    out = {}
    for avg in ("macro", "weighted"):
        out[avg] = {}
        for m in ("precision", "recall", "f1"):
            v = pc[m]
            if avg == "macro":
                out[avg][m] = float(v.mean()) if len(v) else 0.0
            else:
                out[avg][m] = float((v * w).sum() / w.sum()) if w.sum() > 0 else 0.0
        out[avg]["support"] = int(w.sum())
    return out


def accuracy(targets, preds) -> float:
    y, p = _labels(targets, "targets"), _labels(preds, "preds")
    return float(np.mean(y == p)) if len(y) else 0.0


def top_k_accuracy(logits, targets, k: int) -> float:
    """Fraction of samples whose target is among the k highest logits.

    A target counts as in the top k when fewer than k classes score strictly higher than it.
    """
    z, y = _logits(logits), _labels(targets, "targets")
    if len(y) == 0:
        return 0.0
    true_score = z[np.arange(len(y)), y][:, None]
    higher = (z > true_score).sum(axis=1)
    return float(np.mean(higher < k))


def calibration_bins(logits, targets, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Reliability-diagram data: per equal-width confidence bin (edges on [0, 1]), the count, the mean
    confidence and the accuracy of the samples whose top softmax probability falls in (lo, hi]."""
    y = _labels(targets, "targets")
    prob = softmax(logits)
    conf = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur for a softmax
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return {"edges": edges, "count": count, "confidence": _safe_div(conf_sum, count),
            "accuracy": _safe_div(acc_sum, count)}


def expected_calibration_error(logits, targets, n_bins: int = ECE_BINS) -> float:
    """ECE: the support-weighted mean |accuracy - confidence| over `n_bins` equal-width bins."""
    b = calibration_bins(logits, targets, n_bins)
    n = b["count"].sum()
    if n == 0:
        return 0.0
    return float(np.sum(b["count"] / n * np.abs(b["accuracy"] - b["confidence"])))


def summary(logits, targets, classes: list[str]) -> dict:
    """Everything metrics.json records about one evaluated split, as plain JSON-able values."""
    z, y = _logits(logits), _labels(targets, "targets")
    k = len(classes)
    if z.shape[1] != k:
        raise ValueError(f"logits have {z.shape[1]} columns but there are {k} classes")
    pred = predictions(z)
    cm = confusion_matrix(y, pred, k)
    pc = per_class(cm)
    avg = averages(cm)
    loss = cross_entropy(z, y)
    out = {
        "n": int(len(y)),
        "num_classes": k,
        "accuracy": accuracy(y, pred),
        "loss": loss if math.isfinite(loss) else None,
        "ece": expected_calibration_error(z, y),
        "macro": avg["macro"],
        "weighted": avg["weighted"],
    }
    if k > 5:
        out["top5"] = top_k_accuracy(z, y, 5)
    out["per_class"] = [
        {"index": i, "name": str(c), "precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
         "f1": float(pc["f1"][i]), "support": int(pc["support"][i]), "predicted": int(pc["predicted"][i]),
         "accuracy": float(pc["accuracy"][i])}
        for i, c in enumerate(classes)
    ]
    out["confusion"] = cm.tolist()
    return out


def worst_failures(targets: np.ndarray, pred: np.ndarray, losses: np.ndarray, *, overall: int = 64,
                   pairs: int = 8, per_pair: int = 8) -> np.ndarray:
    """Indices of the failures a report shows: the `overall` highest-loss ones, and the `per_pair` highest-loss
    ones of each of the `pairs` most frequent (true, predicted) pairs, the pairs that the diagnostics name
    and the failure gallery draws (report.plots_images.failure_gallery: at most 8 pairs, 8 images each)."""
    wrong = np.flatnonzero(pred != targets)
    by_loss = wrong[np.argsort(-losses[wrong], kind="stable")]
    keep = [by_loss[:overall]]
    k = int(max(targets.max(initial=0), pred.max(initial=0))) + 1
    counts = np.bincount(targets[wrong] * k + pred[wrong], minlength=k * k)
    for cell in np.argsort(-counts, kind="stable")[:pairs]:  # the order of diagnose.confused_pairs
        if counts[cell] == 0:
            break
        t, p = divmod(int(cell), k)
        keep.append(by_loss[(targets[by_loss] == t) & (pred[by_loss] == p)][:per_pair])
    out = np.concatenate(keep)
    return out[np.sort(np.unique(out, return_index=True)[1])]  # first occurrence order, no repeats
