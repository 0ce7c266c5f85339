"""Building a model from its config: `build_model(cfg.model, ...)`, the weight init, and the name check.

Builders are registered with `@MODELS.register("name")` (models/_registry.py) as functions
`(*, num_classes, in_channels, input_size, **options)`; importing this module imports the model
files, so MODELS is filled here. `build_model` passes `batchnorm`, `dropout`, `padding` and
`options` on to the builder, refuses options the builder does not take (naming them), and applies
the weight init.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from cnnlab.config import ConfigError
from cnnlab.errors import InputError
from cnnlab.models import fast, layers, zoo  # noqa: F401  (each registers its models)
from cnnlab.models._registry import MODELS, library_of


class ModelConfigError(InputError, ValueError):
    """A model option the builder does not take, or a value it refuses."""


def check_name(name: str, key: str = "model.name") -> None:
    """Refuse an unknown model name, naming the key and the closest names (before any work).
    Library names (`torchvision:<arch>`, `timm:<arch>`) are checked by the library when built."""
    if library_of(name)[0] is None and name not in MODELS:
        raise ConfigError(f"{key}={name!r}: {MODELS.unknown_message(name)}")


def builder_options(name: str) -> list[str]:
    fn = MODELS.get(name)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]


def build_model(mcfg, *, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """The model a ModelConfig names, on CPU, initialised, with pretrained weights and freezing applied."""
    name = mcfg.name
    if library_of(name)[0] is not None:
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
