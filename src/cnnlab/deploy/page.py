"""The Grad-CAM page of `cnnlab predict --gradcam`: one self-contained HTML file (the report's CSS, images
as data URIs) showing each image, its prediction and confidence, and where the evidence for it lies."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch
from PIL import Image

from cnnlab.report.html import CSS

e = html.escape
PAGE_CSS = """
.cams{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.cams .card{margin:0;padding:12px}.pair{display:flex;gap:6px}.pair img{width:50%;image-rendering:pixelated;
border-radius:6px}.path{font:12px/1.4 ui-monospace,monospace;color:var(--muted);word-break:break-all}
.pred{font-weight:600;margin:6px 0 2px}main{max-width:1200px;margin:0 auto;padding:28px}
"""


class CamCollector:
    """Grad-CAM overlays for the first `limit` predicted images (model, layer found on the first batch)."""

    def __init__(self, clf, limit: int = 200, display: int = 160):
        self.clf, self.limit, self.display = clf, limit, display
        self.cards: list[str] = []
        self.layer = None
        self.layer_name = ""
        self.total = 0

    def add(self, refs: list[str], pixels: torch.Tensor, probs: torch.Tensor, top_k: int) -> None:
        from cnnlab.report.plots_model import cam_layer, gradcam, layer_label

        self.total += len(refs)
        room = self.limit - len(self.cards)
        if room <= 0 or not len(refs):
            return
        refs, pixels, probs = refs[:room], pixels[:room], probs[:room]
        x = self.clf.normalize(pixels.to(self.clf.device))
        if self.layer is None:
            found = cam_layer(self.clf.model, x[:1])
            if found is None:
                self.limit = 0
                return
            name, self.layer = found
            self.layer_name = layer_label(self.clf.model, name)
        pred = probs.argmax(1).to(self.clf.device)
        maps, _ = gradcam(self.clf.model, x, self.layer, pred)
        for ref, img, cam, p in zip(refs, pixels, maps, probs):
            self.cards.append(self._card(ref, img, cam, p, top_k))

    def _png(self, arr: np.ndarray) -> str:
        im = Image.fromarray(arr)
        scale = max(1, self.display // max(im.size))
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def _card(self, ref: str, img: torch.Tensor, cam: np.ndarray, p: torch.Tensor, top_k: int) -> str:
        from matplotlib import colormaps

        rgb = img.permute(1, 2, 0).numpy()
        rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb
        heat = colormaps["jet"](cam)[..., :3] * 255.0
        over = np.clip(0.55 * rgb + 0.45 * heat, 0, 255).astype(np.uint8)
        order = p.argsort(descending=True)[:top_k].tolist()
        classes = self.clf.classes
        best = order[0]
        rest = ", ".join(f"{e(classes[i])} {100 * float(p[i]):.1f}%" for i in order[1:])
        return (f'<div class="card"><div class="pair"><img src="{self._png(rgb.astype(np.uint8))}" alt="image">'
                f'<img src="{self._png(over)}" alt="Grad-CAM"></div><div class="pred">{e(classes[best])} · '
                f'{100 * float(p[best]):.1f}%</div>{f"<div class=note>{rest}</div>" if rest else ""}'
                f'<div class="path">{e(ref)}</div></div>')

    def html(self, run_dir: str, skipped: list[tuple[str, str]]) -> str:
        shown = len(self.cards)
        head = (f"{shown} of {self.total} predicted images" if self.total > shown else f"{shown} images")
        layer = f" on {e(self.layer_name)}" if self.layer_name else ""
        skip = ""
        if skipped:
            items = "".join(f"<li><code>{e(r)}</code>: {e(why)}</li>" for r, why in skipped[:200])
            more = f"<li>... and {len(skipped) - 200} more</li>" if len(skipped) > 200 else ""
            skip = f'<div class="card"><b>Skipped {len(skipped)} input(s)</b><ul>{items}{more}</ul></div>'
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cnnlab predict · '
                f'{e(str(run_dir))}</title><style>{CSS}{PAGE_CSS}</style></head><body><main>'
                f'<h1>Predictions of {e(str(run_dir))}</h1><p class="note">{head}; left: the image as the model sees '
                f'it, right: Grad-CAM{layer} for the predicted class (red = the evidence for it).</p>{skip}'
                f'<div class="cams">{"".join(self.cards)}</div></main></body></html>\n')
