"""A model written as a list of layers in YAML; the first linear layer's input size is inferred.

    model:
      name: layers
      layers:
        - conv: {out: 16, k: 3, padding: 1}
        - batchnorm
        - relu
        - maxpool: 2
        - flatten
        - linear: 64          # in_features inferred (e.g. 16*4*4), nobody computes it by hand
        - relu
        - dropout: 0.5
        - linear: classes     # 'classes' = the data set's number of classes

Any activation of torch.nn by its snake_case name (elu, gelu, leaky_relu, silu, mish, prelu, ...), with
its keyword arguments as a mapping (`elu: {alpha: 0.5}`); `batchnorm` after a linear layer is a
BatchNorm1d; `basic_block: {out: 128, stride: 2}` is torchvision's ResNet BasicBlock (a 1x1 conv + BN
downsample on its shortcut when the shape changes); `torchvision: {model: resnet18, upto: layer2}` takes
a torchvision model's top-level modules in order up to (and with) the one named: ResNet stage surgery,
with the rest of the list as its head.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.modules import activation as _act

from cnnlab.errors import InputError
from cnnlab.models._registry import MODELS

# every activation module of torch.nn by snake_case name: ReLU -> relu, LeakyReLU -> leaky_relu, SiLU -> silu
ACTIVATIONS = {re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", n.replace("ReLU", "Relu").replace("SiLU", "Silu")).lower():
               getattr(_act, n)
               for n in _act.__all__ if n not in ("MultiheadAttention", "Softmax2d", "Threshold")}
LAYER_KINDS = ["conv", "maxpool", "avgpool", "batchnorm", "dropout", "flatten", "linear", "adaptive_avgpool",
               "global_avgpool", "basic_block", "torchvision", *sorted(ACTIVATIONS)]


class LayerSpecError(InputError, ValueError):
    pass


def _parse(spec, i: int) -> tuple[str, dict]:
    """'relu' | {conv: {out: 16, k: 3}} | {maxpool: 2} | {linear: 64} -> (kind, kwargs)."""
    where = f"model.layers[{i}]"
    if isinstance(spec, str):
        kind, arg = spec, None
    elif isinstance(spec, dict) and len(spec) == 1:
        kind, arg = next(iter(spec.items()))
    else:
        raise LayerSpecError(f"{where}={spec!r}: a layer is a name ('relu') or one 'name: args' pair")
    if kind not in LAYER_KINDS:
        import difflib

        close = difflib.get_close_matches(str(kind), LAYER_KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LayerSpecError(f"{where}: unknown layer {kind!r}.{hint} Known: {', '.join(LAYER_KINDS)}")
    if arg is None:
        return kind, {}
    if isinstance(arg, dict):
        return kind, dict(arg)
    first = {"conv": "out", "maxpool": "k", "avgpool": "k", "dropout": "p", "linear": "out",
             "adaptive_avgpool": "size", "leaky_relu": "slope", "elu": "alpha", "celu": "alpha", "prelu": "num_parameters",
             "basic_block": "out", "torchvision": "model"}.get(kind)
    if first is None:
        raise LayerSpecError(f"{where}: layer {kind!r} takes no argument, got {arg!r}")
    return kind, {first: arg}


def build_layers(specs: list, *, num_classes: int, in_channels: int, input_size: int,
                 batchnorm: bool | None = None, dropout: float | None = None, padding: int | None = None) -> nn.Sequential:
    """nn.Sequential from layer specs. Shapes are tracked with a dummy forward pass, layer by layer.

    `padding` sets every conv's padding that the spec leaves out; `dropout` every dropout's p that it
    leaves out; `batchnorm: false` drops batchnorm layers (true inserts one after each conv lacking it).
    """
    x = torch.zeros(1, in_channels, input_size, input_size)  # (B, C, H, W) probe
    mods: list[nn.Module] = []
    specs = list(specs)
    for i, spec in enumerate(specs):
        kind, kw = _parse(spec, i)
        where = f"model.layers[{i}] ({kind})"
        try:
            if kind == "conv":
                mod = nn.Conv2d(x.shape[1], int(kw.pop("out")), kernel_size=kw.pop("k", kw.pop("kernel", 3)),
                                stride=kw.pop("stride", 1), padding=kw.pop("padding", padding if padding is not None else 0),
                                bias=kw.pop("bias", True))
            elif kind in ("maxpool", "avgpool"):
                cls = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
                k = kw.pop("k", 2)
                mod = cls(k, stride=kw.pop("stride", k), padding=kw.pop("padding", 0))
            elif kind == "batchnorm":
                if batchnorm is False:
                    continue
                mod = nn.BatchNorm2d(x.shape[1]) if x.ndim == 4 else nn.BatchNorm1d(x.shape[1])
            elif kind == "relu":
                mod = nn.ReLU(inplace=True)
            elif kind == "leaky_relu":
                mod = nn.LeakyReLU(kw.pop("negative_slope", kw.pop("slope", 0.01)), inplace=True)
            elif kind in ACTIVATIONS:
                try:
                    mod = ACTIVATIONS[kind](**kw)
                except TypeError as e:
                    raise LayerSpecError(f"{where}: {e}") from None
                kw = {}
            elif kind == "basic_block":
                mod = basic_block(x.shape[1], int(kw.pop("out")), stride=int(kw.pop("stride", 1)))
            elif kind == "torchvision":
                mod = torchvision_trunk(kw.pop("model"), upto=kw.pop("upto", None), in_channels=x.shape[1],
                                        where=where)
            elif kind == "dropout":
                p = kw.pop("p", dropout if dropout is not None else 0.5)
                mod = nn.Dropout2d(p) if kw.pop("spatial", False) else nn.Dropout(p)
            elif kind == "flatten":
                mod = nn.Flatten()
            elif kind in ("adaptive_avgpool", "global_avgpool"):
                mod = nn.AdaptiveAvgPool2d(kw.pop("size", 1))
            elif kind == "linear":
                out = kw.pop("out")
                out = num_classes if out in ("classes", "num_classes") else int(out)
                if x.ndim != 2:
                    mods.append(nn.Flatten())
                    x = mods[-1](x)
                mod = nn.Linear(x.shape[1], out, bias=kw.pop("bias", True))
        except KeyError as e:
            raise LayerSpecError(f"{where}: missing argument {e.args[0]!r}") from None
        except (TypeError, ValueError, RuntimeError) as e:  # conv: [1, 2], out: -5, k: x
            raise LayerSpecError(f"{where}: bad value in {spec!r}: {e}") from None
        if kind in ("conv", "linear") and mod.weight.shape[0] < 1:
            raise LayerSpecError(f"{where}: {spec!r} has no outputs; 'out' must be >= 1")
        if kw:
            raise LayerSpecError(f"{where}: unknown argument(s) {', '.join(map(repr, kw))}")
        try:
            with torch.no_grad():
                mod.eval()
                x = mod(x)
        except RuntimeError as e:
            raise LayerSpecError(f"{where}: cannot apply to input of shape {tuple(x.shape)} "
                                 f"(the feature map may have shrunk below the kernel): {e}") from None
        mods.append(mod)
        if kind == "conv" and batchnorm is True and not (i + 1 < len(specs) and _parse(specs[i + 1], i + 1)[0] == "batchnorm"):
            mods.append(nn.BatchNorm2d(x.shape[1]))
    if x.ndim != 2 or x.shape[1] != num_classes:
        raise LayerSpecError(f"model.layers: the last layer gives shape {tuple(x.shape)}; end with "
                             "'linear: classes' so the output is (batch, number of classes)")
    return nn.Sequential(*mods)


def basic_block(inplanes: int, planes: int, stride: int = 1) -> nn.Module:
    """torchvision's ResNet BasicBlock (conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU); the shortcut is a
    1x1 conv with stride + BN, as in ResNet-18's layer2, whenever the stride or the width changes."""
    from torchvision.models.resnet import BasicBlock, conv1x1

    down = None
    if stride != 1 or inplanes != planes:
        down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride=stride, downsample=down)


def torchvision_trunk(name: str, *, upto: str | None, in_channels: int, where: str) -> nn.Module:
    """A torchvision model's top-level modules in order, up to and with `upto` (ResNet-18 up to layer2:
    conv1, bn1, relu, maxpool, layer1, layer2); randomly initialised, its first conv rebuilt for
    `in_channels` other than 3."""
    from torchvision.models import get_model, list_models

    if name not in list_models():
        import difflib

        close = difflib.get_close_matches(str(name), list_models(), n=1)
        raise LayerSpecError(f"{where}: {name!r} is not a torchvision model." +
                             (f" Did you mean {close[0]!r}?" if close else ""))
    children = list(get_model(name).named_children())
    names = [n for n, _ in children]
    if upto is not None and upto not in names:
        raise LayerSpecError(f"{where}: upto={upto!r} is not a top-level module of {name}; "
                             f"its modules in order: {', '.join(names)}")
    cut = names.index(upto) + 1 if upto is not None else len(names)
    kept = nn.Sequential()
    for n, m in children[:cut]:
        kept.add_module(n, m)
    first = kept[0]
    if in_channels != 3 and isinstance(first, nn.Conv2d):
        kept[0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                            bias=first.bias is not None)
    return kept


@MODELS.register("layers")
def layers(*, num_classes: int, in_channels: int, input_size: int, layers: list,
           batchnorm: bool | None = None, dropout: float | None = None, padding: int | None = None) -> nn.Module:
    """A model written layer by layer in the config (`model.layers`)."""
    return build_layers(layers, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                        batchnorm=batchnorm, dropout=dropout, padding=padding)
