"""Test-time augmentation (`train.tta`): an image batch's views and their weights, one definition for the
final evaluation (training/loop.evaluate), `cnnlab eval` and the deployed classifier.

- none: the image.
- flip: the mean of the image's and its mirror's logits.
- airbench (airbench94's `tta_level=2`, Keller Jordan 2024): mirror x {no shift, the image reflect-padded by
  one pixel and cropped at its top-left corner, and at its bottom-right corner}; 0.25 for each untranslated
  view and 0.125 for each shifted one (logits averaged, as airbench does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "flip", "airbench")


def views(x: torch.Tensor, mode: str) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of a normalised (B, C, H, W) batch; the weights sum to 1."""
    if mode == "none":
        return [(1.0, x)]
    if mode == "flip":
        return [(0.5, x), (0.5, x.flip(3))]
    if mode != "airbench":
        raise ValueError(f"train.tta={mode!r}: must be one of {', '.join(MODES)}")
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:2 + h, 2:2 + w]]
    return [(0.25, x), (0.25, x.flip(3))] + [(0.125, v) for s in shifted for v in (s, s.flip(3))]


def tta_logits(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 (B, K) logits of `model` on batch `x`, averaged over the `mode`'s views with their weights."""
    out = None
    for weight, v in views(x, mode):
        logits = model(v).float()
        out = logits if weight == 1.0 else (weight * logits if out is None else out + weight * logits)
    return out
