"""The run report's sections, declared once: id, title, lead, the figures it shows (each with the function
in figures.py that draws it) and its content blocks (tables, text, key-value lists). build.py draws every
figure named here; html.py and md.py render SECTIONS in order, each block type in its own way. Adding a
section is one `Section(...)` in SECTIONS (plus a draw function when it has a new figure).

The content model (Table, KeyValues, Pre, Findings, Columns and the rich cells Code, Bar, Flagged) is plain
data: no HTML or Markdown in it. Leads are plain text in which `backticks` mark code."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from cnnlab import rundir as R
from cnnlab.analysis import imbalance
from cnnlab.analysis.diagnose import flagged_classes
from cnnlab.report import figures as F
from cnnlab.report.fmt import facts, num, pct

# ----------------------------------------------------------------------------------------------
# The content model


@dataclass(frozen=True)
class Figure:
    """plots/<key>.png, drawn by `draw(Drawing) -> Drawn | None`, shown under `title`."""

    key: str
    title: str
    draw: Callable[[F.Drawing], F.Drawn | None]


@dataclass(frozen=True)
class Figures:
    """Figures shown together; `pair`: two abreast in HTML when the classes are few (small figures)."""

    figures: tuple[Figure, ...]
    pair: bool = False


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Bar:
    """A share shown as a bar (HTML) and a percentage; `low` colours it as flagged."""

    value: float
    low: bool = False


@dataclass(frozen=True)
class Flagged:
    """A name marked as flagged by the diagnostics."""

    text: str


@dataclass
class Table:
    head: list[str]
    rows: list[list]  # cells: str, Code, Bar or Flagged
    num: set[int] = field(default_factory=set)  # right-aligned number columns
    nowrap: set[int] = field(default_factory=set)
    totals: int = 0  # the last `totals` rows are totals (bold, ruled)
    title: str | None = None
    note: list | None = None  # a line below: plain text and Code pieces
    scroll: bool = False  # a long table: a scrolling box in HTML


@dataclass
class KeyValues:
    items: dict
    title: str | None = None
    code: bool = False  # values shown as code


@dataclass
class Pre:
    text: str
    lang: str = ""


@dataclass
class Findings:
    items: list  # analysis.diagnose.Finding
    notes: list[str]


@dataclass
class Columns:
    """Blocks side by side (HTML); one after another elsewhere."""

    blocks: list
    kind: str = "split"  # split: two wide columns; grid: a card beside a table


@dataclass(frozen=True)
class Section:
    """One section of the report. `lead`: text, or a function of the context returning it (None: no lead).
    `parts`: Figures, or functions of the context returning a block (or a list of blocks, or None)."""

    id: str
    title: str
    lead: str | Callable[[dict], str]
    parts: tuple[Figures | Callable[[dict], Any], ...] = ()


def lead_of(section: Section, ctx: dict) -> str:
    return section.lead(ctx) if callable(section.lead) else section.lead.format(split=facts(ctx)["split"])


def blocks_of(section: Section, ctx: dict) -> list:
    """The section's parts for this run: Figures reduced to the figures drawn, empty parts left out."""
    out = []
    for part in section.parts:
        if isinstance(part, Figures):
            shown = tuple(f for f in part.figures if f.key in ctx["figs"])
            if shown:
                out.append(Figures(shown, part.pair))
            continue
        got = part(ctx)
        out += [b for b in (got if isinstance(got, list) else [got]) if b]
    return out


def figures_of(sections) -> list[Figure]:
    """Every figure the sections show, in page order."""
    return [f for s in sections for p in s.parts if isinstance(p, Figures) for f in p.figures]


# ----------------------------------------------------------------------------------------------
# Blocks built from the run


def _diagnostics(ctx: dict):
    return Findings(ctx["findings"], ctx["run"]["notes"]) if ctx["findings"] or ctx["run"]["notes"] else None


def per_class_rows(ctx: dict) -> list[dict]:
    """Per-class accuracy rows, hardest first, with where each class's mistakes go."""
    s = ctx["run"]["summary"]
    cm = np.asarray(s["confusion"])
    names = [r["name"] for r in s["per_class"]]
    flagged = flagged_classes(ctx["findings"])
    out = []
    for i, r in enumerate(s["per_class"]):
        row = cm[i].copy()
        row[i] = 0
        j = int(np.argmax(row))
        conf = f"'{names[j]}': {row[j]:,} ({pct(row[j] / r['support'])})" if row[j] > 0 and r["support"] else "–"
        out.append({**r, "correct": int(cm[i, i]), "confused": conf, "flagged": r["name"] in flagged})
    return sorted(out, key=lambda r: (r["accuracy"], r["index"]))


def _classes(ctx: dict):
    s = ctx["run"]["summary"]
    if not s:
        return None
    rows = [[r["name"], num(r["precision"]), num(r["recall"]), num(r["f1"]), f"{r['support']:,}"]
            for r in s["per_class"]]
    rows.append(["accuracy", "", "", num(s["accuracy"]), f"{s['n']:,}"])
    rows += [[f"{a} avg", num(s[a]["precision"]), num(s[a]["recall"]), num(s[a]["f1"]), f"{s[a]['support']:,}"]
             for a in ("macro", "weighted")]
    report = Table(["class", "precision", "recall", "F1", "support"], rows, {1, 2, 3, 4}, {0}, totals=3,
                   title="Classification report", scroll=True)
    # the training images of each class beside its recall (= accuracy here): a rare class's lag shows at a glance
    train = imbalance.train_counts(ctx["run"]["data"])
    head = ["class"] + (["train images"] if train else []) + ["images", "predicted", "correct", "recall",
                                                               "mistaken for"]
    rows = [[Flagged(r["name"]) if r["flagged"] else r["name"]] + ([f"{train.get(r['name'], 0):,}"] if train else [])
            + [f"{r['support']:,}", f"{r['predicted']:,}", f"{r['correct']:,}", Bar(r["accuracy"], r["flagged"]),
               r["confused"]] for r in per_class_rows(ctx)]
    o = 1 if train else 0
    per = Table(head, rows, set(range(1, 4 + o)), {4 + o}, title="Per class, hardest first", scroll=True,
                note=[f"Imbalanced training classes: try {imbalance.KEYS}."] if _imbalanced(ctx) else None)
    return Columns([report, per])


def _imbalanced(ctx: dict) -> bool:
    return any(f.kind == "imbalance" and not f.data.get("used") for f in ctx["findings"])


def _calibration_lead(ctx: dict) -> str:
    split = facts(ctx)["split"]
    if ctx["run"].get("calibration"):
        return (f"On the {split} split: how far confidence and accuracy agree, before and after dividing the logits "
                "by a temperature fitted on the validation split (`cnnlab.load` and `cnnlab predict` apply it).")
    return (f"On the {split} split: how far confidence and accuracy agree. `train.calibrate: true` (or `cnnlab "
            "calibrate RUN`) fits a temperature on the validation split.")


def _calibration(ctx: dict):
    cal = ctx["run"].get("calibration")
    if not cal:
        return None
    split = cal.get("split", "evaluated")
    items = {"temperature": f"{cal['temperature']:.4f}",
             f"ECE on {split}": f"{num(cal['ece_before'], '.4f')} → {num(cal['ece_after'], '.4f')}",
             f"NLL on {split}": f"{num(cal['nll_before'], '.4f')} → {num(cal['nll_after'], '.4f')}",
             "fitted on": f"validation ({(cal.get('val') or {}).get('n', 0):,} images)"}
    if cal.get("same_split"):
        items["note"] = "no test split: fitted and measured on the same images (optimistic)"
    return KeyValues(items, title="Temperature scaling")


def _failures_table(ctx: dict, top: int = 15):
    wrong = sorted((r for r in ctx["run"]["pred_rows"] if r["target"] != r["pred"]), key=lambda r: -r["loss"])[:top]
    if not wrong:
        return None
    rows = [[str(r["index"]), Code(str(r["id"])), r["target_name"], r["pred_name"], pct(r["confidence"]),
             num(r["loss"])] for r in wrong]
    return Table(["row", "id", "true", "predicted", "confidence", "loss"], rows, {0, 4, 5},
                 title="Highest-loss mistakes",
                 note=[f"All {ctx['n_failures']:,} misclassified images are listed in ", Code(R.FAILURES), "."])


def _data(ctx: dict):
    run = ctx["run"]
    d = run["data"]
    if not d:
        return None
    counts = d.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if counts.get(s)]
    rows = [[c] + [f"{counts[s].get(c, 0):,}" for s in splits] for c in run["classes"]]
    rows.append(["total"] + [f"{sum(counts[s].values()):,}" for s in splits])
    table = Table(["class"] + splits, rows, set(range(1, len(splits) + 1)), totals=1, scroll=True)
    kv = {"data set": d.get("name"), "classes": d.get("num_classes"), "input": facts(ctx)["input"],
          "evaluated split": d.get("eval_split"),
          "mean": ", ".join(f"{v:.4f}" for v in d.get("mean") or []),
          "std": ", ".join(f"{v:.4f}" for v in d.get("std") or [])}
    out = [Columns([KeyValues({k: v for k, v in kv.items() if v not in (None, "")}, title="Summary"), table],
                   kind="grid")]
    fnd = d.get("findings") or []
    if fnd:
        out.append(Table(["severity", "kind", "path", "message"],
                         [[str(x.get("severity", "")), str(x.get("kind", "")), Code(str(x.get("path", ""))),
                           str(x.get("message", ""))] for x in fnd[:100]], title="Data checks", scroll=True))
    return out


def _lr_find_lead(ctx: dict) -> str | None:
    found = ctx["run"].get("lr_find")
    if not found:
        return None
    return (f"`optim.lr: auto`: the learning-rate range test ran first ({found.get('steps')} steps, "
            f"{found.get('stopped')}) and chose {found.get('suggestion'):g}, a tenth of {found.get('lr_min'):.3g} "
            f"where the smoothed loss was lowest; config.yaml records it.")


def _model_lead(ctx: dict) -> str:
    mod = ctx["run"]["model"] or {}
    return (f"{mod.get('name', '')}: {mod.get('total_params', 0):,} parameters, "
            f"{mod.get('trainable_params', 0):,} trainable.")


def _model(ctx: dict):
    text = (ctx["run"]["model"] or {}).get("summary_text")
    return Pre(text.rstrip()) if text else None


def _config(ctx: dict):
    text = ctx["run"]["config_text"]
    return Pre(text.rstrip(), "yaml") if text else None


def _env(ctx: dict):
    env = ctx["run"]["env"]
    return KeyValues({k: " ".join(v) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else str(v)
                      for k, v in env.items()}, code=True) if env else None


# ----------------------------------------------------------------------------------------------
# The report, in page order


SECTIONS: list[Section] = [
    Section("diagnostics", "Diagnostics", "What the saved results say, most serious first.", (_diagnostics,)),
    Section("curves", "Training curves", "How loss and accuracy moved during training.", (Figures((
        Figure("curves", "Loss and accuracy per epoch", F.curves),
        Figure("steps", "Training loss per step", F.steps),
        Figure("grad_norms", "Gradient norms by depth", F.grad_norms),
        Figure("lr", "Learning rate", F.learning_rate))),)),
    Section("lr_find", "Learning rate", _lr_find_lead, (Figures((
        Figure("lr_find", "Learning-rate range test", F.lr_find),)),)),
    Section("confusion", "Confusion matrices", "On the {split} split: where the mistakes go.", (Figures((
        Figure("confusion_matrix", "Confusion matrix (counts)", F.confusion_counts),
        Figure("confusion_normalized", "Confusion matrix (share of each true class)", F.confusion_share)),
        pair=True),)),
    Section("classes", "Per-class results", "Precision, recall and F1 per class, as scikit-learn reports them.", (
        _classes, Figures((Figure("per_class", "Accuracy per class", F.per_class),)))),
    Section("calibration", "Calibration", _calibration_lead, (_calibration, Figures((
        Figure("reliability", "Reliability", F.reliability),
        Figure("reliability_calibrated", "Reliability after temperature scaling", F.reliability_calibrated)),
        pair=True))),
    Section("failures", "Failures", "The mistakes with the highest loss: confidently wrong, or far from the right "
            "class.", (Figures((Figure("failures", "Failures", F.failures),)), _failures_table)),
    Section("predictions", "Predictions", "A sample of images with what the model says.",
            (Figures((Figure("predictions", "Sample predictions", F.predictions),)),)),
    Section("inside", "Inside the model", "Filters, activations and class evidence of the best checkpoint.",
            (Figures((Figure("filters", "First-layer filters", F.filters),
                      Figure("feature_maps", "Feature maps", F.feature_maps),
                      Figure("gradcam", "Grad-CAM", F.gradcam))),)),
    Section("gallery", "Data set samples", "What the training images look like, class by class.",
            (Figures((Figure("data_gallery", "Training images per class", F.data_gallery),)),)),
    Section("data", "Data", "Class counts per split and the normalisation used.", (_data,)),
    Section("model", "Model", _model_lead, (_model,)),
    Section("config", "Config", "The resolved config; `cnnlab train config.yaml` repeats the run.", (_config,)),
    Section("environment", "Environment", "Versions and machine.", (_env,)),
]
