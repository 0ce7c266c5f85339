"""Training failures told apart from data bugs: a model that collapsed (predicts one or two classes, near
chance, loss flat) is not a label-mapping bug; vanishing or exploding gradients named from grads.csv.
Pure functions from saved summaries to findings (`diagnose` gathers them)."""
from __future__ import annotations

import numpy as np

from cnnlab.analysis import gradients


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _finding(*args):
    from cnnlab.analysis.diagnose import Finding  # (diagnose imports this module)

    return Finding(*args)


def collapse(summary: dict, history: dict | None = None) -> dict | None:
    """A model that did not learn, told apart from a label-mapping bug: it predicts at most two classes
    (of three or more) or its accuracy stays near chance (below 1.5x the majority class's share). A
    label-mapping bug instead leaves one class never predicted while the others are learnt."""
    cm = np.asarray(summary["confusion"], dtype=np.float64)
    k, total = len(cm), cm.sum()
    if k < 3 or total == 0:
        return None
    acc = float(np.trace(cm) / total)
    predicted = int((cm.sum(0) > 0).sum())
    chance = float(max(cm.sum(1).max() / total, 1.0 / k))
    if predicted > 2 and acc >= 1.5 * chance:
        return None
    tl = (history or {}).get("train_loss")
    tl = np.asarray(tl if tl is not None else [], dtype=np.float64)
    flat = None
    if len(tl) >= 2 and np.all(np.isfinite(tl)) and tl[0]:
        flat = float((tl[0] - tl.min()) / abs(tl[0]))
    return {"accuracy": acc, "chance": chance, "predicted_classes": predicted, "classes": k,
            "loss_drop": flat}


def collapse_finding(c: dict, grads: dict | None) -> Finding:
    loss = "" if c["loss_drop"] is None else (
        f" The training loss fell by only {_pct(c['loss_drop'])}." if c["loss_drop"] < 0.1
        else f" The training loss fell by {_pct(c['loss_drop'])}.")
    health = gradients.gradient_health(grads)
    line = gradients.summary_line(grads)
    why = (f" Gradients: {health['kind']} ({health['text']})." if health
           else f" Gradients: {line}." if line else "")
    return _finding(
        "error", "collapsed", "The model did not learn (collapsed), not a label bug",
        f"It predicts {c['predicted_classes']} of {c['classes']} classes and is {_pct(c['accuracy'])} accurate "
        f"(chance {_pct(c['chance'])}).{loss}{why} Classes that are never predicted here are a symptom of "
        "the failed training, not of wrong labels.",
        "Make the net trainable: batch norm (model.batchnorm: true), a smaller or larger learning rate, "
        "kaiming init (model.init: kaiming_uniform), fewer layers, or ReLU instead of saturating activations; "
        "see the gradient norms by depth.", {**c, "gradients": health})


def gradient_findings(grads: dict | None) -> list[Finding]:
    h = gradients.gradient_health(grads)
    if h is None:
        return []
    what = "Vanishing gradients" if h["kind"] == "vanishing" else "Exploding gradients"
    fix = ("Add batch norm or residual connections, use ReLU-family activations and kaiming init, or make "
           "the net shallower." if h["kind"] == "vanishing" else
           "Lower optim.lr, add batch norm or warm-up, or clip gradients.")
    return [_finding("warning", f"{h['kind']}_gradients", what, f"{h['text'][0].upper()}{h['text'][1:]}.", fix, h)]
