"""Transfer learning: pretrained weights (torchvision name or local state dict), freezing, input spec.
Models are built with the data set's classes first, so loading skips the old head (its shapes differ)
and the new head starts fresh; `freeze` then turns gradients off where asked."""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cnnlab.errors import InputError
from cnnlab.models._registry import library_of
from cnnlab.models.hooks import freeze_bn

log = logging.getLogger("cnnlab")

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class TransferError(InputError, ValueError):
    """Weights that cannot be found, read or matched, or a freeze spec the model cannot honour."""


@dataclass
class LoadReport:
    """What `load_pretrained` did, key by key (attached to the model as `model.pretrained_report`)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, file shape, model shape)
    adapted: list[str] = field(default_factory=list)  # RGB stem summed to one input channel
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored

    def to_dict(self) -> dict:
        return {"source": self.source, "loaded": len(self.loaded), "adapted": self.adapted,
                "skipped": [{"key": k, "file_shape": list(a), "model_shape": list(b)} for k, a, b in self.skipped],
                "missing": self.missing, "unexpected": self.unexpected}

    def text(self) -> str:
        lines = [f"pretrained {self.source}: {len(self.loaded)} tensors loaded"]
        lines += [f"  adapted {k} (RGB filters summed to one channel)" for k in self.adapted]
        lines += [f"  skipped {k}: file {list(a)} vs model {list(b)} (kept as initialised)" for k, a, b in self.skipped]
        if self.missing:
            lines.append(f"  not in the file (kept as initialised): {', '.join(self.missing[:8])}"
                         + (" ..." if len(self.missing) > 8 else ""))
        if self.unexpected:
            lines.append(f"  in the file but not in the model (ignored): {', '.join(self.unexpected[:8])}"
                         + (" ..." if len(self.unexpected) > 8 else ""))
        return "\n".join(lines)


# ---- finding the weights


def _arch(name: str) -> str:
    return library_of(name)[1]


def torchvision_weights(weights: str, name: str = ""):
    """The torchvision weights enum member for 'ResNet18_Weights.IMAGENET1K_V1' (or 'DEFAULT' with a model name)."""
    from torchvision.models import get_model_weights, get_weight

    try:
        if "." in weights:
            return get_weight(weights)
        return get_model_weights(_arch(name))[weights]
    except (KeyError, ValueError, AttributeError) as e:
        raise TransferError(
            f"model.pretrained={weights!r}: not a file and not a torchvision weights name for model {name!r} "
            f"({e}); give e.g. 'ResNet18_Weights.IMAGENET1K_V1', 'DEFAULT', or a path to a saved state dict") from None


def _is_file_ref(weights: str) -> bool:
    return Path(weights).expanduser().exists() or "/" in weights or "\\" in weights \
        or weights.lower().endswith(WEIGHT_FILE_SUFFIXES)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a file, read safely (`weights_only=True`); checkpoints' 'model'/'state_dict' unwrapped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TransferError(f"model.pretrained={path!r}: no such file")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise TransferError(f"model.pretrained={path!r}: reading .safetensors needs "
                                "`pip install safetensors`") from None
        obj = load_file(str(p))
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise TransferError(f"model.pretrained={path!r}: cannot be read as a state dict with weights_only=True "
                                f"(a whole pickled model? save model.state_dict() instead): {e}") from None
    for key in ("model", "state_dict", "model_state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TransferError(f"model.pretrained={path!r}: holds no tensors by name (expected a state dict)")
    # DataParallel / DistributedDataParallel and torch.compile prefixes
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, weights: str, *, name: str) -> LoadReport:
    """Copy every tensor of `weights` whose name and shape match into `model`; report the rest.

    `weights`: a local file (state dict), a torchvision weights name (downloaded by torchvision when
    not cached), or for `timm:<name>` models 'timm' (already loaded by timm.create_model).
    """
    if library_of(name)[0] == "timm" and weights.lower() in ("timm", "default", "true"):
        report = LoadReport(source=f"timm ({_arch(name)})")
        model.pretrained_report = report
        return report
    if _is_file_ref(weights):
        state = read_state_dict(weights)
        source = str(weights)
    else:
        w = torchvision_weights(weights, name)
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, OSError, hash mismatch...
            raise TransferError(f"model.pretrained={weights!r}: could not download {w} ({e}); offline? put the "
                                "file in ~/.cache/torch/hub/checkpoints or give a local path") from None
        source = str(w)
    report = LoadReport(source=source)
    own = model.state_dict()
    with torch.no_grad():
        for key, target in own.items():
            if key not in state:
                report.missing.append(key)
                continue
            value = state[key]
            if value.shape == target.shape:
                target.copy_(value)
                report.loaded.append(key)
            elif (value.ndim == 4 and target.ndim == 4 and target.shape[1] == 1 and value.shape[1] == 3
                  and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]):
                target.copy_(value.sum(dim=1, keepdim=True))  # grey input: an RGB filter summed over colours
                report.loaded.append(key)
                report.adapted.append(key)
            else:
                report.skipped.append((key, tuple(value.shape), tuple(target.shape)))
    report.unexpected = [k for k in state if k not in own]
    if not report.loaded:
        raise TransferError(f"model.pretrained={weights!r}: none of its {len(state)} tensors match model {name!r} "
                            f"(file keys start {list(state)[:3]}, model keys {list(own)[:3]}); wrong architecture?")
    head_name = head(model)[0]
    odd = [k for k, _, _ in report.skipped if not k.startswith(head_name + ".")]
    odd += [k for k in report.missing if not k.startswith(head_name + ".") and not k.endswith("num_batches_tracked")]
    if odd:
        warnings.warn(f"model.pretrained={weights!r}: {len(odd)} tensors outside the head were not loaded "
                      f"(e.g. {odd[:3]}); see model.pretrained_report", stacklevel=2)
    log.info(report.text())
    model.pretrained_report = report
    return report


# ---- input resolution and normalisation of the weights


class InputSpec(NamedTuple):
    resize: int | None  # the square side the weights were trained at (e.g. 224); None = unknown
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    eval_resize: int | None = None  # their evaluation recipe: shorter side to this (e.g. 256), then the center crop


def input_spec(weights: str | None, name: str = "") -> InputSpec:
    """(resize, mean, std) the weights expect; all None for local files and timm (unknown here)."""
    if not weights or _is_file_ref(weights) or library_of(name)[0] == "timm":
        return InputSpec(None, None, None)
    t = torchvision_weights(weights, name).transforms()  # no download: the preset only
    crop, resize = getattr(t, "crop_size", None), getattr(t, "resize_size", None)
    return InputSpec(int(crop[0]) if crop else None, tuple(float(v) for v in getattr(t, "mean", ())) or None,
                     tuple(float(v) for v in getattr(t, "std", ())) or None, int(resize[0]) if resize else None)


def data_defaults(mcfg, dcfg) -> dict:
    """DataConfig fields the weights ask for and the config leaves unset (None): image_size, mean/std,
    for RGB statistics channels 3, and eval_resize_size, their evaluation recipe (ImageNet weights: shorter
    side 256, center crop 224; scaled in proportion when data.image_size is set to another side).
    Use: `data = dataclasses.replace(cfg.data, **data_defaults(cfg.model, cfg.data))`."""
    spec = input_spec(mcfg.pretrained, mcfg.name)
    out: dict = {}
    if spec.resize and dcfg.image_size is None:
        out["image_size"] = spec.resize
    size = out.get("image_size", dcfg.image_size)
    if spec.eval_resize and dcfg.eval_resize_size is None and size:  # weights.transforms(): resize, then crop
        out["eval_resize_size"] = max(size, round(spec.eval_resize * size / spec.resize)) if spec.resize else \
            max(size, spec.eval_resize)
    if spec.mean and dcfg.mean is None and dcfg.std is None:
        out.update(mean=spec.mean, std=spec.std)
        if dcfg.channels is None:
            out["channels"] = len(spec.mean)  # grey images are repeated to RGB for RGB weights
    return out


# ---- head, stages and freezing


def head(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the classifier head: timm's get_classifier(), else the last Linear registered
    (or the last Conv2d in a model without Linear layers, e.g. SqueezeNet)."""
    named = list(model.named_modules())
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        for n, m in named:
            if m is clf and n:
                return n, m
    for kind in (nn.Linear, nn.Conv2d):
        found = [(n, m) for n, m in named if isinstance(m, kind) and n]
        if found:
            return found[-1]
    raise TransferError(f"cannot find a classifier head (no Linear or Conv2d) in {type(model).__name__}")


def _split_at_pools(mods: list[nn.Module]) -> list[list[nn.Module]]:
    stages, cur = [], []
    for m in mods:
        if isinstance(m, (nn.Flatten, nn.Linear)):
            break
        cur.append(m)
        if isinstance(m, POOLS):
            stages.append(cur)
            cur = []
    if any(p.numel() for m in cur for p in m.parameters()):
        stages.append(cur)
    return [s for s in stages if any(True for m in s for _ in m.parameters())]


def stages(model: nn.Module) -> list[list[nn.Module]]:
    """The model's stages in input-to-output order, for `freeze: <n>`: ResNet stem + layer1..4; a
    `features` Sequential (VGG, MobileNet, EfficientNet...) or a layer-list model split after each pooling
    layer (or child by child when it has none); otherwise the top-level children with parameters."""
    if hasattr(model, "layer1") and hasattr(model, "conv1"):
        stem = [m for m in (model.conv1, getattr(model, "bn1", None)) if m is not None]
        return [stem] + [[getattr(model, f"layer{i}")] for i in range(1, 6) if hasattr(model, f"layer{i}")]
    body = model.features if isinstance(getattr(model, "features", None), nn.Sequential) else model
    if isinstance(body, nn.Sequential):
        children = list(body.children())
        if any(isinstance(m, POOLS) for m in children):
            return _split_at_pools(children)
        return [[m] for m in children if any(True for _ in m.parameters())]
    head_mod = head(model)[1]
    return [[m] for m in model.children()
            if any(True for _ in m.parameters()) and not any(x is head_mod for x in m.modules())]


def _freeze_modules(mods) -> None:
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(False)
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                freeze_bn(sub)


def freeze(model: nn.Module, spec: str | int) -> list[str]:
    """Turn gradients off: 'backbone' = everything but the head, 'none', or '<n>' = the n first stages.
    Frozen BatchNorm layers go to eval mode, and the loop keeps them there (`hooks.after_train_mode`).
    Returns the names of the frozen parameters."""
    spec = str(spec).strip()
    if spec == "none":
        return []
    if spec == "backbone":
        head_name, head_mod = head(model)
        head_params = {id(p) for p in head_mod.parameters()}
        rest = [m for n, m in model.named_modules() if n != head_name and not n.startswith(head_name + ".")]
        for p in model.parameters():
            if id(p) not in head_params:
                p.requires_grad_(False)
        _freeze_modules([m for m in rest if isinstance(m, _BatchNorm)])
    elif spec.isdigit():
        st = stages(model)
        n = int(spec)
        if n > len(st):
            raise TransferError(f"model.freeze={spec!r}: the model has only {len(st)} stages "
                                f"({', '.join('+'.join(type(m).__name__ for m in s) for s in st)})")
        for s in st[:n]:
            _freeze_modules(s)
    else:
        raise TransferError(f"model.freeze={spec!r}: must be none, backbone or a number of first stages")
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold (those not frozen)."""
    return [p for p in model.parameters() if p.requires_grad]
