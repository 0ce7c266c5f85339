"""Training failures told apart from data bugs: a model that collapsed (predicts one or two classes, near
chance, loss flat) or has not yet learnt (classes never predicted while the others are still poorly
learnt) is not a label-mapping bug; vanishing or exploding gradients named from grads.csv.
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


# Evidence a never-predicted class needs before it is called a label-mapping bug: enough images of it, few
# such classes, and the classes the model does predict learnt (a model still learning predicts few classes).
LABEL_BUG_MIN_SUPPORT = 10
LABEL_BUG_MIN_OTHERS_ACC = 0.5
LABEL_BUG_MIN_TRAIN_ACC = 0.5  # a mislabelled class is still fitted (as the class its labels say)


def unlearnt(summary: dict, history: dict | None = None) -> dict | None:
    """Classes never (or almost never: <= 10% of their images) predicted without the evidence of a
    label-mapping bug, or None (no such class, or the evidence is there). A mapping bug leaves one or a few
    classes (at most a third) never predicted among >= LABEL_BUG_MIN_SUPPORT images each, while the classes
    the model predicts are learnt: on average at least LABEL_BUG_MIN_OTHERS_ACC right and twice chance, and
    the training accuracy (history, when given) reached LABEL_BUG_MIN_TRAIN_ACC. Anything less (a tiny or
    1-2 epoch run) is a model that has not learnt those classes yet."""
    cm = np.asarray(summary["confusion"], dtype=np.float64)
    k, total = len(cm), cm.sum()
    support, predicted = cm.sum(1), cm.sum(0)
    dead = [i for i in range(k) if support[i] > 0 and predicted[i] == 0]
    rare = [i for i in range(k) if support[i] >= 10 and 0 < predicted[i] <= 0.1 * support[i]]
    if not (dead or rare) or total == 0:
        return None
    live = [i for i in range(k) if support[i] > 0 and i not in dead + rare]
    others = float(np.mean([cm[i, i] / support[i] for i in live])) if live else 0.0
    chance = float(max(support.max() / total, 1.0 / k))
    reasons = []
    if len(dead) + len(rare) > max(1, k // 3):
        reasons.append(f"{len(dead) + len(rare)} of {k} classes are (almost) never predicted, and a mapping bug "
                       "hits one or a few")
    if others < max(LABEL_BUG_MIN_OTHERS_ACC, 2 * chance):
        reasons.append(f"the classes it does predict are only {_pct(others)} right on average (not yet learnt)")
    ta = np.asarray((history or {}).get("train_acc") if (history or {}).get("train_acc") is not None else [],
                    dtype=np.float64)
    if len(ta) and np.isfinite(ta).any() and np.nanmax(ta) < LABEL_BUG_MIN_TRAIN_ACC:
        reasons.append(f"training accuracy reached only {_pct(float(np.nanmax(ta)))} (it has not fitted its own "
                       "training images yet)")
    if dead and all(support[i] < LABEL_BUG_MIN_SUPPORT for i in dead) and not rare:
        reasons.append(f"too few images to tell (fewer than {LABEL_BUG_MIN_SUPPORT} of each)")
    if not reasons:
        return None
    names = [r["name"] for r in summary["per_class"]]
    return {"classes": [names[i] for i in dead + rare], "indices": dead + rare, "never": [names[i] for i in dead],
            "rarely": [names[i] for i in rare], "of": k, "others_accuracy": others,
            "accuracy": float(np.trace(cm) / total), "reasons": reasons}


def unlearnt_finding(u: dict) -> Finding:
    def listed(names):
        return ", ".join(f"'{c}'" for c in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    what = " and ".join(x for x in (f"never predicts {listed(u['never'])}" * bool(u["never"]),
                                    f"almost never predicts {listed(u['rarely'])}" * bool(u["rarely"])) if x)
    return _finding(
        "warning", "unlearnt_classes",
        f"{len(u['classes'])} of {u['of']} classes {'never' if not u['rarely'] else '(almost) never'} predicted "
        "yet: the model is still learning",
        f"The model {what}; overall it is {_pct(u['accuracy'])} accurate. This is not evidence of a label-mapping "
        f"bug: {'; '.join(u['reasons'])}. A label bug shows as a class never predicted while the other classes "
        "are learnt.",
        "Train longer (train.epochs) or with a better learning rate; if a class is still never predicted once "
        "the others are learnt, check its labels (data.json's counts per split and class order).", u)


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
