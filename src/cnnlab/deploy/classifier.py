"""`cnnlab.load(run_dir)`: a trained run as a classifier.

The model is rebuilt from the run's config and checkpoint; inputs get the run's own evaluation
preprocessing (the data pipeline's decode: mode -> channels, bilinear resize to the run's input size;
then its Normalizer with the run's mean/std), so a file predicted here scores exactly as it did in the
run's predictions.csv (with a calibrated run, `cnnlab calibrate`, the probabilities are softmax(logits / T)
with the run's temperature; predictions.csv keeps the raw ones). Inputs: paths (also `archive.zip::member`), PIL images, numpy arrays, tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab import config as C
from cnnlab.data.base import decode, decode_image, eval_resize
from cnnlab.data.loader import Normalizer
from cnnlab.errors import InputError


class RunFolderError(InputError, FileNotFoundError):
    """A missing run folder, or one without the files or checkpoint needed (the CLI exits 2, one line)."""


@dataclass
class RunFacts:
    """What using a run needs from its folder."""

    dir: Path
    config: C.Config
    classes: list[str]
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: dict
    checkpoint: str  # best | last
    epoch: int | None
    env: dict
    temperature: float = 1.0  # from calibration.json (train.calibrate / `cnnlab calibrate`): probabilities = softmax(logits / T)


def read_run(run_dir: str | Path, checkpoint: str = "best") -> RunFacts:
    """The one place that reads a run folder for deploy/, through rundir.RunDir."""
    from cnnlab import rundir as R
    from cnnlab.training import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such run folder")
    for name in (R.CONFIG, R.DATA):
        if not (run_dir / name).is_file():
            raise RunFolderError(f"{run_dir}: not a run folder (no {name} in it)")
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint={checkpoint!r}: use 'best' or 'last'")
    path = R.checkpoint_path(run_dir, checkpoint)
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: the run has no checkpoint ({R.CHECKPOINTS}/{path.name} is missing; "
                             "was it stopped before its first epoch ended?)")
    run = R.RunDir(run_dir)
    cfg, data = run.config, run.data
    c = ckpt.load(path)
    env = run.env or {}
    return RunFacts(dir=run_dir, config=cfg, classes=list(data["classes"]), channels=int(data["in_channels"]),
                    size=int(data["input_size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                    weights=c["model"], checkpoint=checkpoint, epoch=(c.get("state") or {}).get("epoch"), env=env,
                    temperature=run.temperature if checkpoint == "best" else 1.0)  # fitted to the best checkpoint


def build_model(run: RunFacts) -> torch.nn.Module:
    """The run's model with its checkpoint's weights, on the CPU, in eval mode (pretrained weights are
    not fetched again: the checkpoint holds them)."""
    from cnnlab.models import build_model as build

    mcfg = dataclasses.replace(run.config.model, pretrained=None)
    model = build(mcfg, num_classes=len(run.classes), in_channels=run.channels, input_size=run.size)
    model.load_state_dict(run.weights)
    return model.eval()


@dataclass
class Prediction:
    """One image's result: the top class, its probability, and every class's probability."""

    label: str
    index: int
    confidence: float
    probs: np.ndarray  # (K,) float32, in the order of `classes`
    classes: list[str]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(self.classes[i], float(self.probs[i])) for i in order]


class Transform:
    """One input (path, PIL image, array, tensor) -> the run's model input: float (C, S, S), normalised.
    `pixels` stops before normalisation: uint8 (C, S, S)."""

    def __init__(self, channels: int, size: int, mean, std, resize: tuple = ("squash", None)):
        self.channels, self.size, self.resize = channels, size, tuple(resize)  # resize: base.eval_resize
        self.normalize = Normalizer(mean, std, "cpu")

    def pixels(self, x) -> torch.Tensor:
        if isinstance(x, (str, Path)):
            return decode(str(x), self.channels, self.size, *self.resize)
        if isinstance(x, Image.Image):
            return decode_image(x, self.channels, self.size, *self.resize)
        return decode_image(_array_image(x), self.channels, self.size, *self.resize)

    def __call__(self, x) -> torch.Tensor:
        return self.normalize(self.pixels(x)[None])[0]

    def __repr__(self) -> str:
        n = self.normalize
        return (f"Transform(channels={self.channels}, size={self.size}, resize={self.resize}, "
                f"mean={(n.mean.flatten() / 255).tolist()}, "
                f"std={(1 / n.inv_std.flatten() / 255).tolist()})")


def _array_image(x) -> Image.Image:
    """An (H, W), (H, W, C) or (C, H, W) array or tensor as a Pillow image: uint8/uint16 pixels as they are,
    floats taken as [0, 1] (torchvision's ToTensor convention)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.ndim == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
            x = x.permute(1, 2, 0)
        x = x.numpy()
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got {a.shape}")
    if a.dtype.kind == "f":
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype == np.uint16 and a.ndim == 2:
        return Image.fromarray(a)  # mode I;16
    elif a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"integer image values must be 0-255 (uint8); got {a.dtype} in [{a.min()}, {a.max()}]")
        a = a.astype(np.uint8)
    return Image.fromarray(a)


def _is_single(x) -> bool:
    if isinstance(x, (str, Path, Image.Image)):
        return True
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim <= 3
    return False


class Classifier:
    """A trained run ready to classify: `.predict(x)`, `.predict_proba(x)`, `.model`, `.classes`, `.transform`."""

    def __init__(self, run: RunFacts, *, device: str | torch.device | None = None):
        from cnnlab import process
        from cnnlab.training import loop

        self.run = run
        self.classes = run.classes
        cfg = run.config
        self.device = torch.device(device) if device is not None else process.pick_device(cfg.train.device)
        self.model = build_model(run).to(self.device)
        # the layout and precision the run evaluated in (loop.evaluate_weights), so results match it
        self.channels_last = loop.use_channels_last(cfg, self.model, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = loop.amp_dtype(cfg, self.device)
        self.tta = C.tta_mode(cfg.train)  # the run's test-time augmentation (models/tta.py)
        self.transform = Transform(run.channels, run.size, run.mean, run.std, eval_resize(cfg.data))
        self.normalize = Normalizer(run.mean, run.std, self.device, self.channels_last)

    def __repr__(self) -> str:
        return (f"Classifier({str(self.run.dir)!r}, {self.run.config.model.name}, {len(self.classes)} classes, "
                f"input {self.run.channels}x{self.run.size}x{self.run.size}, {self.run.checkpoint} checkpoint)")

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, *, tta: bool | None = None) -> torch.Tensor:
        """uint8 (B, C, S, S) pixels -> float32 (B, K) logits on the CPU, as the run's evaluation computes them."""
        from cnnlab.models.tta import tta_logits

        mode = self.tta if tta is None else ("none" if not tta else "flip" if self.tta == "none" else self.tta)
        x = self.normalize(pixels.to(self.device))
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = tta_logits(self.model, x, mode)
        return out.float().cpu()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits -> class probabilities: softmax(logits / T), T the run's fitted temperature (1 when the
        run was not calibrated). The predicted class is the same either way; only the confidences change."""
        return (logits / self.run.temperature).softmax(1)

    def _pixels(self, items: list) -> torch.Tensor:
        if not items:
            return torch.zeros(0, self.run.channels, self.run.size, self.run.size, dtype=torch.uint8)
        return torch.stack([self.transform.pixels(x) for x in items])

    def predict_proba(self, x, *, batch_size: int = 256, tta: bool | None = None) -> np.ndarray:
        """Class probabilities (N, K) for a batch (or (K,) for one input)."""
        single = _is_single(x)
        items = [x] if single else list(x)
        out = []
        for i in range(0, len(items), batch_size):
            out.append(self.probabilities(self.logits(self._pixels(items[i:i + batch_size]), tta=tta)))
        probs = torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)
        return probs[0] if single else probs

    def predict(self, x, *, batch_size: int = 256, tta: bool | None = None):
        """A `Prediction` for one input (a path, PIL image, (H, W[, C]) array, (C, H, W) tensor), a list of
        them for a list or a batch ((N, ...) array or tensor)."""
        single = _is_single(x)
        probs = self.predict_proba([x] if single else x, batch_size=batch_size, tta=tta)
        preds = [Prediction(label=self.classes[int(p.argmax())], index=int(p.argmax()), confidence=float(p.max()),
                            probs=p, classes=self.classes) for p in probs]
        return preds[0] if single else preds


def load(run_dir: str | Path, *, checkpoint: str = "best", device: str | torch.device | None = None) -> Classifier:
    """A finished run folder as a `Classifier` (its best checkpoint unless `checkpoint='last'`)."""
    return Classifier(read_run(run_dir, checkpoint), device=device)
