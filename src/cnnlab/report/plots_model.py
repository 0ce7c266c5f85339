"""Figures from inside a trained model: first-layer filters, feature maps per conv stage, and Grad-CAM
(Selvaraju et al. 2017) with its target layer found automatically, using plain forward and tensor hooks.
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnlab.report.plots import BAD, GOOD, INK, short
from cnnlab.report.plots_images import image_grid, show_image


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)


def filters(model: torch.nn.Module, *, max_filters: int = 64) -> Figure | None:
    """The first conv layer's kernels: RGB when it reads 3 channels, else a diverging map (blue -, red +)."""
    conv = first_conv(model)
    if conv is None:
        return None
    w = conv.weight.detach().cpu().float().numpy()[:max_filters]  # (O, I, kh, kw)
    n = len(w)
    ncol = min(16, n)
    nrow = -(-n // ncol)
    side = float(np.clip(9.0 / ncol, 0.55, 1.0))
    fig, axes = image_grid(nrow, ncol, cell=side, title=0.0, gap=0.08, top=0.4)
    lim = float(np.abs(w).max()) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, w):
        if f.shape[0] == 3:
            ax.imshow(((f - f.min()) / (np.ptp(f) or 1.0)).transpose(1, 2, 0), interpolation="nearest")
        else:
            ax.imshow(f.mean(0), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.suptitle(f"First-layer filters ({w.shape[0]} of {conv.out_channels}, {w.shape[2]}x{w.shape[3]}"
                 f"{', mean over input channels' if w.shape[1] not in (1, 3) else ''})", fontsize=10,
                 fontweight="bold", y=1 - 0.1 / fig.get_size_inches()[1], va="top")
    return fig


def _forward_with_hooks(model: torch.nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One no-grad forward pass of x with the given (already registered) hooks, removed afterwards."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def conv_stages(model: torch.nn.Module, x: torch.Tensor, *, max_stages: int = 6) -> list[tuple[str, torch.Tensor]]:
    """Activations after each conv stage for input x (1, C, H, W).

    A stage starts at a Conv2d and takes the output of the last module after it (batchnorm, activation)
    with the same shape, before the next conv. With more than `max_stages`, the last stage at each
    resolution is kept, then an even sample.
    """
    names = {m: n for n, m in model.named_modules()}
    stages: list[list] = []

    def hook(mod, _inp, out):
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or len(list(mod.children())):
            return
        if isinstance(mod, torch.nn.Conv2d):
            stages.append([names.get(mod, "conv"), out.detach()])
        elif stages and out.shape == stages[-1][1].shape:
            stages[-1][1] = out.detach()

    _forward_with_hooks(model, x, [m.register_forward_hook(hook) for m in model.modules()])
    out = [(n, t[0].clone()) for n, t in stages]
    if len(out) > max_stages:
        last_per_res = {}
        for n, t in out:
            last_per_res[tuple(t.shape[1:])] = (n, t)
        out = list(last_per_res.values())
        if len(out) > max_stages:
            out = [out[i] for i in np.linspace(0, len(out) - 1, max_stages).round().astype(int)]
    return out


def feature_maps(model: torch.nn.Module, x: torch.Tensor, image, *, channels: int | list[int] = 8) -> Figure | None:
    """The input image, then for each conv stage its most active channels (by mean activation), or the
    channels listed (those a stage has)."""
    stages = conv_stages(model, x)
    if not stages:
        return None
    n = channels if isinstance(channels, int) else len(channels)
    fig, axes = image_grid(len(stages), n + 1, cell=1.15, title=0.42, gap=0.1)
    for row, (name, act) in zip(axes, stages):
        show_image(row[0], image)
        c, h, w = act.shape
        row[0].set_title(f"{layer_label(model, name)}\n{c}×{h}×{w}", fontsize=8, fontweight="bold", color=INK)
        top = (torch.argsort(act.flatten(1).mean(1), descending=True)[:channels] if isinstance(channels, int)
               else torch.tensor([ch for ch in channels if 0 <= ch < c], dtype=torch.long))
        for j, ax in enumerate(row[1:]):
            ax.axis("off")
            if j < len(top):
                ax.imshow(act[top[j]].numpy(), cmap="viridis", interpolation="nearest")
                ax.set_title(f"channel {int(top[j])}", fontsize=7.5, fontweight="normal")
    return fig


def layer_label(model: torch.nn.Module, name: str) -> str:
    """'3' -> 'layer 3 (conv 8→16)'; 'layer4.1.conv2' -> 'layer4.1.conv2 (conv 512→512)'."""
    mod = dict(model.named_modules()).get(name)
    base = f"layer {name}" if name.isdigit() else name
    if isinstance(mod, torch.nn.Conv2d):
        return f"{base} (conv {mod.in_channels}→{mod.out_channels})"
    return base


def cam_layer(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, torch.nn.Module] | None:
    """The last Conv2d (in execution order) whose output is larger than 1x1: Grad-CAM's target layer."""
    seen: list = []
    _forward_with_hooks(model, x, [m.register_forward_hook(lambda mod, i, o, n=n: seen.append((n, mod, tuple(o.shape))))
                                   for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)])
    ok = [(n, m) for n, m, shape in seen if shape[-1] * shape[-2] > 1]
    return ok[-1] if ok else None


def gradcam(model: torch.nn.Module, x: torch.Tensor, layer: torch.nn.Module, target: torch.Tensor | None = None):
    """Grad-CAM (Selvaraju et al. 2017) maps (N, H, W) in [0, 1] for x (N, C, H, W) and the `target` classes
    (default: predicted). Returns (maps, logits)."""
    store: dict = {}

    def fwd(mod, inp, out):
        store["act"] = out
        out.register_hook(lambda g: store.__setitem__("grad", g))
        return out.clone()  # an in-place activation after the layer must not overwrite what we keep

    h = layer.register_forward_hook(fwd)
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # a graph even when the weights are frozen
            logits = model(x)
            target = logits.argmax(1) if target is None else target
            model.zero_grad(set_to_none=True)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        h.remove()
    act, grad = store["act"].detach(), store["grad"].detach()
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))  # (N, 1, h, w)
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).numpy(), logits.detach()


def gradcam_grid(images, maps: np.ndarray, rows: list[dict], layer_name: str) -> Figure:
    """Each image above its Grad-CAM overlay (for the predicted class)."""
    n = len(rows)
    fig, axes = image_grid(2, n, cell=1.3, title=0.28, gap=0.12, top=0.35)
    for j, (r, im, cam) in enumerate(zip(rows, images, maps)):
        ok = r["target"] == r["pred"]
        show_image(axes[0, j], im, GOOD if ok else BAD)
        axes[0, j].set_title(f"true {short(r['target_name'], 10)}", fontsize=8.5, fontweight="normal")
        show_image(axes[1, j], im)
        axes[1, j].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        axes[1, j].set_title(f"pred {short(r['pred_name'], 10)} · {100 * r['confidence']:.0f}%", fontsize=8.5,
                             fontweight="normal", color=GOOD if ok else BAD)
    fig.suptitle(f"Grad-CAM on {layer_name}: where the evidence for the predicted class lies",
                 fontsize=10, fontweight="bold", y=1 - 0.08 / fig.get_size_inches()[1], va="top")
    return fig
