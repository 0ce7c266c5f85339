"""Figures made of images (matplotlib, Agg, in plots.py's look): the grid helpers, the gallery of training images
per class (the real pixels as decoded, not normalised, not augmented), the failure gallery and the sample
predictions. plots_model.py draws the model's own images (filters, feature maps, Grad-CAM) with the same helpers."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from cnnlab.report.plots import BAD, GOOD, INK, plt, short

def show_image(ax, img: np.ndarray, frame: str | None = None) -> None:
    """Draw a (C, H, W) uint8 image; an optional coloured frame."""
    img = np.asarray(img)
    if img.shape[0] == 3:
        ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
    else:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(frame is not None)
        if frame:
            sp.set_edgecolor(frame)
            sp.set_linewidth(3)


def image_grid(nrow: int, ncol: int, *, cell: float = 1.2, title: float = 0.4, gap: float = 0.1,
                top: float = 0.0, head: float = 0.0):
    """A figure of nrow x ncol image axes placed in inches (no layout engine: fast for many images).
    Each row has `head` inches for a heading and `title` inches for per-image titles above its images."""
    width = ncol * (cell + gap) + gap
    row_h = head + title + cell + gap
    height = top + nrow * row_h + gap
    fig = plt.figure(figsize=(width, height))
    axes = np.empty((nrow, ncol), dtype=object)
    for r in range(nrow):
        y = height - top - r * row_h - head - title - cell
        for c in range(ncol):
            axes[r, c] = fig.add_axes(((gap + c * (cell + gap)) / width, y / height, cell / width, cell / height))
    return fig, axes


def failure_gallery(images, rows: list[dict], pair_totals: dict | None = None, *, max_pairs: int = 8,
                    per_pair: int = 5, slots: int = 8) -> Figure | None:
    """Misclassified images, highest loss first, grouped by (true -> predicted) pair.

    rows: the predictions.csv records of `images` (target_name, pred_name, confidence, loss);
    pair_totals: {(true, pred): count over the whole split} to order the pairs and say how many there are.
    Groups are packed left to right into rows of `slots` images, each under its own heading.
    """
    wrong = [(r, im) for r, im in zip(rows, images) if r["target"] != r["pred"]]
    if not wrong:
        return None
    groups: dict = {}
    for r, im in sorted(wrong, key=lambda t: -t[0]["loss"]):
        groups.setdefault((r["target_name"], r["pred_name"]), []).append((r, im))
    totals = pair_totals or {p: len(g) for p, g in groups.items()}
    order = sorted(groups, key=lambda p: (-totals.get(p, 0), -groups[p][0][0]["loss"]))[:max_pairs]
    per_pair = max(per_pair, min(slots, 2 * slots // len(order)))  # few pairs: show more of each
    place, row, col = [], 0, 0  # (pair, row, first slot, width)
    for pair in order:
        w = min(per_pair, len(groups[pair]), slots)
        if col + w > slots:
            row, col = row + 1, 0
        place.append((pair, row, col, w))
        col += w
    fig, axes = image_grid(row + 1, slots, cell=1.3, title=0.26, head=0.45, gap=0.14)
    for ax in axes.flat:
        ax.set_visible(False)
    for pair, r, c, w in place:
        left, right = axes[r, c].get_position(), axes[r, c + w - 1].get_position()
        n = 9 if w == 1 else 18
        fig.text((left.x0 + right.x1) / 2, right.y1 + 0.3 / fig.get_size_inches()[1],
                 f"{short(pair[0], n)} → {short(pair[1], n)}\n", fontsize=9.5, fontweight="bold",
                 color=INK, ha="center", va="bottom")
        hgt = fig.get_size_inches()[1]
        fig.add_artist(plt.Line2D([left.x0, right.x1], [right.y1 + 0.27 / hgt] * 2, color="#cbd5e1", lw=1.2))
        fig.text((left.x0 + right.x1) / 2, right.y1 + 0.3 / fig.get_size_inches()[1],
                 f"{totals.get(pair, len(groups[pair]))} in total", fontsize=8, color="#64748b", ha="center",
                 va="bottom")
        for ax, (rec, im) in zip(axes[r, c:c + w], groups[pair]):
            ax.set_visible(True)
            show_image(ax, im, BAD)
            ax.set_title(f"{100 * rec['confidence']:.0f}% · loss {rec['loss']:.2f}", fontsize=8,
                         fontweight="normal", color=INK, pad=3)
    return fig


def prediction_grid(images, rows: list[dict], *, max_images: int = 32, ncol: int = 8) -> Figure | None:
    """Sample images with the predicted class and confidence; green frame right, red frame wrong."""
    n = min(len(rows), max_images)
    if n == 0:
        return None
    ncol = min(ncol, n)
    fig, axes = image_grid(-(-n // ncol), ncol, cell=1.25, title=0.4, gap=0.12)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r, im in zip(axes.flat, rows[:n], images[:n]):
        ok = r["target"] == r["pred"]
        show_image(ax, im, GOOD if ok else BAD)
        label = f"{short(r['pred_name'], 11)} · {100 * r['confidence']:.0f}%"
        label += "\n " if ok else f"\ntrue {short(r['target_name'], 11)}"
        ax.set_title(label, fontsize=8.5, fontweight="normal", color=GOOD if ok else BAD, pad=3)
    return fig


def data_gallery(images, labels, classes: list[str], *, slots: int = 12, cell: float | None = None) -> Figure | None:
    """A few images of each class, a class per block of consecutive cells under its name, `slots` cells a row.

    images: (N, C, H, W) uint8 grouped by class (as gallery.npz holds them); labels: (N,) class indices."""
    images, labels = np.asarray(images), np.asarray(labels)
    if not len(images):
        return None
    present = list(dict.fromkeys(int(c) for c in labels))  # classes in the file's order
    per = max(int((labels == c).sum()) for c in present)
    per = min(per, slots)
    blocks = max(1, slots // per)  # classes side by side in a row
    ncol, nrow = blocks * per, -(-len(present) // blocks)
    cell = cell or float(np.clip(11.0 / ncol, 0.7, 1.2))
    one = per == 1  # one image a class: its name as the image's title, no block heading
    fig, axes = image_grid(nrow, ncol, cell=cell, title=0.28 if one else 0.0, head=0.0 if one else 0.32,
                           gap=0.1 if one else 0.08)
    for ax in axes.flat:
        ax.set_visible(False)
    height = fig.get_size_inches()[1]
    for b, c in enumerate(present):
        r, c0 = divmod(b, blocks)
        c0 *= per
        row = axes[r, c0:c0 + per]
        for ax, im in zip(row, images[labels == c][:per]):
            ax.set_visible(True)
            show_image(ax, im)
        name = short(classes[c] if c < len(classes) else str(c), 12 if one else 8 * per)
        if one:
            row[0].set_title(name, fontsize=8.5, fontweight="normal", color=INK, pad=3)
            continue
        left, right = row[0].get_position(), row[-1].get_position()
        fig.text((left.x0 + right.x1) / 2, right.y1 + 0.07 / height, name, fontsize=9.5, fontweight="bold",
                 color=INK, ha="center", va="bottom")
        fig.add_artist(plt.Line2D([left.x0, right.x1], [right.y1 + 0.045 / height] * 2, color="#cbd5e1", lw=1.2))
    return fig
