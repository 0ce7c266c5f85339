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
"""
from __future__ import annotations

import torch
from torch import nn

from cnnlab.errors import InputError
from cnnlab.models._registry import MODELS

LAYER_KINDS = ["conv", "maxpool", "avgpool", "batchnorm", "relu", "gelu", "leaky_relu", "tanh", "sigmoid",
               "dropout", "flatten", "linear", "adaptive_avgpool", "global_avgpool"]


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
             "adaptive_avgpool": "size", "leaky_relu": "slope"}.get(kind)
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
            elif kind == "gelu":
                mod = nn.GELU()
            elif kind == "leaky_relu":
                mod = nn.LeakyReLU(kw.pop("slope", 0.01), inplace=True)
            elif kind == "tanh":
                mod = nn.Tanh()
            elif kind == "sigmoid":
                mod = nn.Sigmoid()
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


@MODELS.register("layers")
def layers(*, num_classes: int, in_channels: int, input_size: int, layers: list,
           batchnorm: bool | None = None, dropout: float | None = None, padding: int | None = None) -> nn.Module:
    """A model written layer by layer in the config (`model.layers`)."""
    return build_layers(layers, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                        batchnorm=batchnorm, dropout=dropout, padding=padding)
