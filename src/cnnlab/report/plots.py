"""Figures drawn from a run's saved results (matplotlib, Agg); each function returns a Figure, `save` writes it.

Nothing here recomputes metrics. Figures made of images (galleries, failures, predictions) are in
plots_images.py; those that need the rebuilt model (filters, feature maps, Grad-CAM) in plots_model.py.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

TRAIN, VAL, BEST, BAD, GOOD, INK = "#2563eb", "#ea580c", "#16a34a", "#dc2626", "#16a34a", "#334155"
plt.rcParams.update({
    "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6, "axes.edgecolor": "#94a3b8", "axes.labelcolor": INK, "xtick.color": INK,
    "ytick.color": INK, "legend.frameon": False, "figure.dpi": 110, "savefig.dpi": 110,
})


def save(fig: Figure, path: str | Path, dpi: int | None = None) -> Path:
    """Write `fig` as PNG (no timestamp metadata, so reruns give identical bytes) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tight = "tight" if getattr(fig, "cnnlab_tight", False) else None  # only figures with parts outside the axes grid
    fig.savefig(path, dpi=dpi, bbox_inches=tight, pad_inches=0.08, facecolor="white", metadata={"Software": None})
    plt.close(fig)
    return path


def _col(d: dict, key: str) -> np.ndarray | None:
    v = d.get(key) if d else None
    return None if v is None or len(v) == 0 else np.asarray(v, dtype=np.float64)


def short(name: str, n: int = 14) -> str:
    """A class name cut to n characters, with '$' escaped so matplotlib does not read it as maths."""
    name = str(name)
    name = name if len(name) <= n else name[: n - 1] + "…"
    return name.replace("$", r"\$")


# ----------------------------------------------------------------------------------------------
# Curves


def moving_average(y) -> tuple[np.ndarray, int] | None:
    """A centred moving average of y (no lag, unlike an EMA) over its finite values, window ~len/25 (odd, >= 3),
    NaN where y is; None when fewer than 15 values are finite (then the raw points say it)."""
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(y)
    if finite.sum() < 15:
        return None
    w = max(3, (len(y) // 25) | 1)
    kern = np.ones(w)
    smooth = np.convolve(np.where(finite, y, 0.0), kern, "same") / np.maximum(
        np.convolve(finite.astype(float), kern, "same"), 1)
    return np.where(finite, smooth, np.nan), w


def epoch_axis(ax, epochs) -> None:
    """Whole epochs on the x axis: every epoch ticked up to 20, integer ticks beyond; a single epoch centred
    with room on both sides (not matplotlib's 0.945-1.055 around one point)."""
    from matplotlib.ticker import MaxNLocator

    ep = np.unique(np.asarray(epochs, dtype=np.float64))
    ep = ep[np.isfinite(ep)]
    if not len(ep):
        return
    if len(ep) <= 20:
        ax.set_xticks(ep, [f"{e:.0f}" for e in ep])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(ep) == 1:
        ax.set_xlim(ep[0] - 1, ep[0] + 1)


def value_label(ax, x: float, y: float, text: str, colour: str, *, left: bool = False) -> None:
    """A value written beside its marker (for curves of a single epoch, where no line shows the trend)."""
    ax.annotate(text, (x, y), xytext=(-8 if left else 8, 0), textcoords="offset points", va="center",
                ha="right" if left else "left", color=colour, fontsize=8.5, fontweight="bold")


def curves(history: dict, *, best_epoch: int | None = None, onset: int | None = None) -> Figure:
    """Training vs validation loss and accuracy per epoch; the best epoch and any overfitting onset marked."""
    ep = _col(history, "epoch")
    one = ep is not None and len(ep) == 1  # a single point each: larger markers with their values written
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for ax, what, scale in ((axes[0], "loss", 1.0), (axes[1], "acc", 100.0)):
        for split, colour in (("train", TRAIN), ("val", VAL)):
            y = _col(history, f"{split}_{what}")
            if y is not None:
                ax.plot(ep, y * scale, color=colour, lw=1.8, marker="o", ms=7 if one else 3,
                        label="training" if split == "train" else "validation")
                if one and np.isfinite(y[0]):
                    value_label(ax, ep[0], y[0] * scale, f"{y[0]:.3f}" if what == "loss" else f"{100 * y[0]:.1f}%",
                                colour, left=split == "train")
        if onset is not None:
            ax.axvline(onset, color=BAD, ls="--", lw=1.2)
            ax.axvspan(onset, ep.max(), color=BAD, alpha=0.06, lw=0)
        if onset is not None and what == "loss":
            ax.annotate(f"overfitting from epoch {onset}", (onset, 1), xycoords=("data", "axes fraction"),
                        xytext=(4, -12), textcoords="offset points", color=BAD, fontsize=8)
        if best_epoch is not None:
            ax.axvline(best_epoch, color=BEST, ls=":", lw=1.4)
            y = _col(history, f"val_{what}")
            if y is not None and best_epoch in ep:
                ax.plot([best_epoch], [y[list(ep).index(best_epoch)] * scale], marker="*", ms=13, color=BEST,
                        mec="white", zorder=5, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title("Loss" if what == "loss" else "Accuracy (%)")
        if ep is not None:
            epoch_axis(ax, ep)
    axes[1].legend(loc="lower right")
    return fig


def step_loss(steps: dict, *, diverged_at: int | None = None) -> Figure:
    """Training loss at every logged step, smoothed when there are enough; the learning rate below it."""
    s, loss, lr = _col(steps, "step"), _col(steps, "loss"), _col(steps, "lr")
    if lr is not None:
        fig, (ax, axl) = plt.subplots(2, 1, figsize=(10, 4.4), sharex=True, height_ratios=(3, 1.1),
                                      constrained_layout=True)
    else:
        fig, ax = plt.subplots(figsize=(10, 3.2), constrained_layout=True)
    ax.plot(s, loss, color=TRAIN, alpha=0.35 if len(loss) >= 15 else 1.0, lw=0.9 if len(loss) >= 15 else 1.8,
            marker="o" if len(loss) < 15 else None, ms=3, label="logged")
    finite = np.isfinite(loss)
    smoothed = moving_average(loss)
    if smoothed is not None:
        ax.plot(s, smoothed[0], color=TRAIN, lw=2, label=f"smoothed ({smoothed[1]}-point mean)")
    if finite.any():
        lo, hi = np.nanmin(loss[finite]), np.nanmax(loss[finite])
        if lo > 0 and hi / lo > 30:
            ax.set_yscale("log")
    ep = _col(steps, "epoch")
    for a in ([ax, axl] if lr is not None else [ax]):
        if ep is not None:
            for b in s[1:][np.diff(ep) > 0]:
                a.axvline(b, color="#cbd5e1", lw=0.7, zorder=0)
        if diverged_at is not None:
            a.axvline(diverged_at, color=BAD, ls="--", lw=1.2, label=f"diverged (step {diverged_at})")
    acc = _col(steps, "acc")
    if acc is not None and np.isfinite(acc).any():  # the batch accuracy at the same steps, on its own axis
        axa = ax.twinx()
        acc_smooth = moving_average(acc)
        axa.plot(s, 100 * (acc if acc_smooth is None else acc_smooth[0]), color=VAL, alpha=0.8, lw=1.2,
                 marker="o" if len(acc) < 15 else None, ms=3,
                 label="training accuracy (batch" + (", smoothed)" if acc_smooth is not None else ")"))
        axa.set_ylabel("accuracy (%)", color=VAL)
        axa.legend(loc="center right")
    ax.set(title="Training loss per step (grey lines: epoch boundaries)", ylabel="loss")
    ax.legend(loc="upper right")
    if lr is not None:
        _lr_axes(axl, s, lr, "step")
    else:
        ax.set_xlabel("step")
    return fig


def _lr_axes(ax, x, lr, unit: str) -> None:
    ax.plot(x, lr, color="#7c3aed", lw=1.8, marker="o" if len(lr) < 3 else None, ms=4)
    if unit == "epoch":
        epoch_axis(ax, x)
    ax.set(xlabel=unit, ylabel="learning rate", ylim=(0, max(float(np.nanmax(lr)) * 1.15, 1e-12)))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def learning_rate(steps: dict | None = None, history: dict | None = None) -> Figure:
    """The learning rate over steps (or epochs when no step log exists)."""
    x, lr, unit = (_col(steps, "step"), _col(steps, "lr"), "step") if _col(steps, "lr") is not None else \
        (_col(history, "epoch"), _col(history, "lr"), "epoch")
    fig, ax = plt.subplots(figsize=(10, 2.4), constrained_layout=True)
    _lr_axes(ax, x, lr, unit)
    ax.set_title("Learning rate")
    return fig


def lr_find(lrs, losses, smoothed, *, suggestion=None, lr_min=None, steepest=None) -> Figure:
    """The learning-rate range test: smoothed loss against the learning rate (log axis), the raw loss faint,
    the lowest point, the steepest descent and the suggestion marked."""
    lrs, raw, sm = (np.asarray(v, dtype=np.float64) for v in (lrs, losses, smoothed))
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    ax.plot(lrs, raw, color="#94a3b8", lw=0.8, alpha=0.7, label="loss per step")
    ax.plot(lrs, sm, color=TRAIN, lw=1.9, label="smoothed")
    ax.set_xscale("log")
    finite = sm[np.isfinite(sm)]
    if len(finite):  # the divergence at the end would squash the interesting part
        lo, first = float(min(finite.min(), np.nanmin(np.where(np.isfinite(raw), raw, np.nan)))), float(finite[0])
        ax.set_ylim(lo - 0.1 * max(first - lo, 1e-3), max(first, lo) + 0.6 * max(first - lo, 1e-3))
    for x, colour, ls, label in ((lr_min, INK, ":", "lowest smoothed loss"), (steepest, "#7c3aed", "--",
                                 "steepest descent"), (suggestion, BAD, "-", "suggestion (lowest / 10)")):
        if x:
            ax.axvline(x, color=colour, ls=ls, lw=1.4, label=f"{label}: {x:.3g}")
    ax.set(xlabel="learning rate", ylabel="training loss", title="Learning-rate range test")
    ax.legend(fontsize=8, loc="upper left")
    return fig


# ----------------------------------------------------------------------------------------------
# Confusion, per-class, calibration


CM_SIDE_BY_SIDE = 12  # up to this many classes the report shows both matrices side by side


def _cm_layout(k: int) -> tuple[float, float, float]:
    """(cell size in inches, tick-label font size, figure side) for a K x K matrix: small matrices are drawn
    to sit two abreast on the page, larger ones to fill its width, beyond ~40 classes at a 0.17-inch floor."""
    cell = float(np.clip(3.2 / k, 0.17, 0.9)) if k <= CM_SIDE_BY_SIDE else float(np.clip(7.0 / k, 0.17, 0.4))
    tick = float(np.clip(cell * 72 * 0.55, 5.0, 10.0))
    return cell, tick, k * cell + 2.6


def _pct_fmt(v, _pos=None) -> str:
    return f"{100 * v:.0f}%" if v >= 0.1 or v == 0 else f"{100 * v:.1f}%"


def confusion(cm, classes: list[str], *, normalize: bool = False) -> Figure:
    """Confusion matrix (rows true, columns predicted). Raw counts in blues; row-normalised shares with the
    correct fraction in blues and the mistakes in reds on their own scale, so small confusions show.
    Numbers are printed only when they fit in a cell; zero cells stay blank."""
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    cell, tick, side = _cm_layout(k)
    fig, ax = plt.subplots(figsize=(side + 0.4, side), constrained_layout=True)
    ax.grid(False)
    bar_w = 0.16 / (k * cell)  # colour bars 0.16 inch wide, right of the matrix

    def colourbar(im, y0, h, label):
        cb = fig.colorbar(im, cax=ax.inset_axes([1 + 2 * bar_w, y0, bar_w, h]), label=label,
                          format=_pct_fmt if normalize else None)
        cb.outline.set_visible(False)

    if normalize:
        rows = cm.sum(1, keepdims=True)
        val = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        diag = np.eye(k, dtype=bool)
        off_max = max(float(val[~diag].max()) if k > 1 else 0.0, 1e-9)
        im1 = ax.imshow(np.ma.masked_where(~diag, val), cmap="Blues", vmin=0, vmax=1)
        im2 = ax.imshow(np.ma.masked_where(diag | (val == 0), val), cmap="Reds", vmin=0, vmax=off_max)
        colourbar(im1, 0.54, 0.46, "correct")
        colourbar(im2, 0.0, 0.46, "confused as")
        text = [[f"{100 * v:.0f}" if v >= 0.005 else "" for v in row] for row in val]
        colour = np.where(diag, val > 0.55, val > 0.55 * off_max)
        title = "Confusion matrix, normalised by true class (%)"
    else:
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(cm.max(), 1))
        colourbar(im, 0.0, 1.0, "images")
        text = [[f"{int(v)}" if v else "" for v in row] for row in cm]
        colour = cm > 0.55 * max(cm.max(), 1)
        title = "Confusion matrix (counts)"
    fig.cnnlab_tight = True  # the colour bars are insets, outside what the layout engine sees
    width = max((len(t) for row in text for t in row), default=1)
    size = min(10.0, cell * 72 * 0.8 / max(0.62 * width, 1.2))
    if size >= 5.5 and cell >= 0.25:  # beyond ~25 classes the colours say it; digits would be noise
        for i in range(k):
            for j in range(k):
                if text[i][j]:
                    ax.text(j, i, text[i][j], ha="center", va="center", fontsize=size,
                            color="white" if colour[i, j] else INK)
    names = [short(c) for c in classes]
    longest = max(map(len, names))
    ax.set_xticks(range(k), names, rotation=90 if longest > max(2.0, 36 / k) else 0, fontsize=tick)
    ax.set_yticks(range(k), names, fontsize=tick)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    ax.tick_params(length=0)
    return fig


def per_class_accuracy(per_class: list[dict], *, highlight: set[str] = frozenset()) -> Figure:
    """Accuracy of each class (share of its images classified right); `highlight` names drawn in red."""
    names = [r["name"] for r in per_class]
    acc = np.array([r["accuracy"] for r in per_class]) * 100
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.2 * k + 2.5, 24)), 3.6), constrained_layout=True)
    colours = [BAD if n in highlight else TRAIN for n in names]
    ax.bar(range(k), acc, color=colours, width=0.75)
    mean = float(np.mean(acc)) if k else 0.0
    ax.axhline(mean, color=INK, ls="--", lw=1)
    fs = float(np.clip(500 / max(k, 1), 5, 9))
    ax.set_xticks(range(k), [short(n) for n in names], rotation=90 if k > 10 else 0, fontsize=fs)
    for i, (n, a) in enumerate(zip(names, acc)):
        if n in highlight:
            ax.get_xticklabels()[i].set_color(BAD)
        if a < 3:  # an empty bar would be invisible: say it
            ax.text(i, 1.5, f"{a:.0f}%", ha="center", va="bottom", fontsize=fs, color=BAD, rotation=90 if k > 30 else 0)
    ax.set(ylim=(0, 105), ylabel="accuracy (%)", title=f"Accuracy per class (dashed: mean {mean:.1f}%)",
           xlim=(-0.7, k - 0.3))
    ax.grid(axis="x", visible=False)
    return fig


def reliability(bins: dict) -> Figure:
    """Reliability diagram: accuracy (bars) and mean confidence (red ticks) per confidence bin, with how many
    images fall in each; bars under their ticks mean overconfidence."""
    edges, count = np.asarray(bins["edges"]), np.asarray(bins["count"])
    mid, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 4.6), sharex=True, height_ratios=(3, 1), constrained_layout=True)
    has = count > 0
    ax.bar(mid[has], np.asarray(bins["accuracy"])[has], width=width[has] * 0.92, color=TRAIN, alpha=0.85,
           label="accuracy")
    conf, half = np.asarray(bins["confidence"])[has], width[has] * 0.46
    ax.hlines(conf, mid[has] - half, mid[has] + half, color=BAD, lw=2.2, label="mean confidence")
    ax.plot([0, 1], [0, 1], color=INK, ls="--", lw=1, label="perfect calibration")
    ax.set(ylabel="accuracy", title="Reliability (confidence vs accuracy)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="best", framealpha=0.9, frameon=True, edgecolor="none")
    axn.bar(mid, count, width=width * 0.92, color="#94a3b8")
    axn.set(xlabel="confidence (top softmax probability)", ylabel="images")
    return fig


def grad_norms(grads: dict, *, verdict: str | None = None, max_lines: int = 8) -> Figure | None:
    """Gradient norm of each weight tensor by depth (input side left, log scale), one line per logged
    step, from early (light) to late (dark); a few steps spread over training when many were logged."""
    layers = [k for k in grads if k not in ("step", "epoch")]
    if not layers:
        return None
    v = np.array([[float(x) for x in grads[k]] for k in layers], dtype=np.float64).T  # (steps, layers)
    steps = _col(grads, "step")
    rows = np.unique(np.linspace(0, len(v) - 1, min(max_lines, len(v))).round().astype(int))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 3), 3.6), constrained_layout=True)
    cmap = plt.get_cmap("Blues")
    for j, r in enumerate(rows):
        y = np.where(v[r] > 0, v[r], np.nan)
        ax.plot(range(1, len(layers) + 1), y, marker="o", ms=3, lw=1.4,
                color=cmap(0.35 + 0.65 * j / max(1, len(rows) - 1)),
                label=f"step {int(steps[r])}" if steps is not None else None)
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(layers) + 1), [short(n, 18) for n in layers], rotation=60, ha="right",
                  fontsize=7)
    ax.set(xlabel="layer (input side left)", ylabel="gradient norm",
           title="Gradient norms by depth" + (f": {verdict} gradients" if verdict else ""))
    ax.legend(fontsize=7, ncol=2)
    return fig
