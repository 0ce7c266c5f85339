"""Figures of the data set itself, before any model: the gallery of training images per class (the real
pixels as decoded, not normalised, not augmented), in plots.py's look."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from cnnlab.report.plots import INK, image_grid, plt, short, show_image


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
