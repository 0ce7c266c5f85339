"""Per-layer gradient norms: measured on the model at the logging interval (RUN/grads.csv) and read back
as vanishing or exploding gradients. The measuring is one function; the reading is pure.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

GRADS_FILE = "grads.csv"  # step, epoch, then one column per weight tensor, input side first
VANISH_RATIO = 1e-3  # first layer's gradient below this share of the last layer's: vanishing
EXPLODE_GROWTH = 100.0  # a layer's gradient this many times its first logged value (and above 10): exploding


def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """{parameter name: L2 norm of its gradient} for every conv/linear weight (tensors of 2+ dimensions),
    in the model's order (input side first). Parameters without a gradient are left out."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and p.grad is not None:
                out[name] = float(torch.linalg.vector_norm(p.grad.float()))
    return out


def _table(grads: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    layers = [k for k in grads if k not in ("step", "epoch")]
    steps = grads.get("step")
    steps = np.asarray(steps if steps is not None else range(len(grads[layers[0]])) if layers else [], dtype=np.float64)
    values = np.array([[float(v) for v in grads[k]] for k in layers], dtype=np.float64).T if layers else np.zeros((0, 0))
    return layers, steps, values  # values: (logged steps, layers)


def gradient_health(grads: dict | None) -> dict | None:
    """Vanishing or exploding gradients in the columns of grads.csv, or None when neither shows.

    Vanishing: the first layer's gradient norm is below 1/1000 of the last layer's (median over the
    logged steps). Exploding: a norm turns non-finite, or a layer's norm grows to 100x its first logged
    value and above 10. Returns {"kind", "text", ...} with the layers and numbers behind the verdict.
    """
    if not grads:
        return None
    layers, steps, v = _table(grads)
    if len(layers) < 2 or v.shape[0] == 0:
        return None
    bad = ~np.isfinite(v)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        return {"kind": "exploding", "layer": layers[c], "step": int(steps[r]),
                "text": f"the gradient of {layers[c]} became {v[r, c]} at step {int(steps[r])}"}
    first, last = np.median(v[:, 0]), np.median(v[:, -1])
    ratio = first / last if last > 0 else math.inf
    growth = v / np.maximum(v[:1], 1e-12)
    hot = (growth > EXPLODE_GROWTH) & (v > 10)
    if hot.any():
        r, c = np.argwhere(hot)[0]
        return {"kind": "exploding", "layer": layers[c], "step": int(steps[r]), "growth": float(growth[r, c]),
                "text": f"the gradient norm of {layers[c]} grew {growth[r, c]:.0f}x, to {v[r, c]:.3g} at step "
                        f"{int(steps[r])}"}
    if last > 0 and ratio < VANISH_RATIO:
        return {"kind": "vanishing", "first_layer": layers[0], "last_layer": layers[-1], "ratio": float(ratio),
                "first": float(first), "last": float(last), "depth": len(layers),
                "text": f"the gradient norm of the first layer ({layers[0]}, median {first:.2g}) is {ratio:.1e} "
                        f"of the last layer's ({layers[-1]}, {last:.2g}) across {len(layers)} layers"}
    return None


def summary_line(grads: dict | None) -> str:
    """The first and last layers' median gradient norms, for findings about a run that did not learn."""
    if not grads:
        return ""
    layers, _, v = _table(grads)
    if not layers or v.shape[0] == 0:
        return ""
    return (f"median gradient norms: {layers[0]} {np.median(v[:, 0]):.2g}, {layers[-1]} "
            f"{np.median(v[:, -1]):.2g} ({len(layers)} layers, {v.shape[0]} logged steps)")
