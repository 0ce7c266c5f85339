"""Models by name: `@MODELS.register("name")` on a builder `(*, num_classes, in_channels, input_size, **options)`.

`build_model(cfg.model, ...)` passes `batchnorm`, `dropout`, `padding` and `options` on to the
builder, refuses options the builder does not take (naming them), and applies the weight init.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from cnnlab.errors import InputError
from cnnlab.registry import Registry

MODELS = Registry("model")

from cnnlab.models import fast, layers, zoo  # noqa: E402,F401  (register the built-in models)


class ModelConfigError(InputError, ValueError):
    """A model option the builder does not take, or a value it refuses."""


def builder_options(name: str) -> list[str]:
    fn = MODELS.get(name)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]


def build_model(mcfg, *, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """The model a ModelConfig names, on CPU, initialised, with pretrained weights and freezing applied."""
    name = mcfg.name
    if name.startswith(("torchvision:", "timm:")):
        from cnnlab.models import external

        model = external.build(name, num_classes=num_classes, in_channels=in_channels, mcfg=mcfg)
    else:
        fn = MODELS.get(name)
        kwargs = dict(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
        for key in ("batchnorm", "dropout", "padding", "layers"):
            val = getattr(mcfg, key)
            if val is not None:
                kwargs[key] = list(val) if key == "layers" else val
        kwargs.update(mcfg.options)
        accepted = set(builder_options(name))
        wrong = [k for k in kwargs if k not in accepted]
        if wrong:
            shown = [k if k in ("batchnorm", "dropout", "padding", "layers") else f"options.{k}" for k in wrong]
            raise ModelConfigError(
                f"model {name!r} does not take model.{', model.'.join(shown)}; "
                f"it takes: {', '.join(sorted(accepted - {'num_classes', 'in_channels', 'input_size'})) or 'nothing'}")
        model = fn(**kwargs)
    init_weights(model, mcfg.init)
    if mcfg.pretrained:
        from cnnlab.models import transfer

        transfer.load_pretrained(model, mcfg.pretrained, name=name)
    if mcfg.freeze != "none":
        from cnnlab.models import transfer

        transfer.freeze(model, mcfg.freeze)
    return model


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear weights (biases to zero); 'default' keeps PyTorch's own init."""
    if scheme == "default":
        return
    fns = {
        "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
        "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
        "xavier_uniform": nn.init.xavier_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
    }
    fn = fns[scheme]
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fn(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
