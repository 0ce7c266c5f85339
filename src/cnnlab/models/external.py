"""Models from other libraries by name: `torchvision:<name>` (any torchvision classifier) and `timm:<name>`.
Built randomly initialised with the data's classes and channels; `transfer.load_pretrained` loads weights
afterwards (for timm, `model.pretrained: timm` lets timm load its own)."""
from __future__ import annotations

import difflib

from torch import nn

from cnnlab.models._registry import library_of

# torchvision classifiers that return (logits, aux logits) in training mode unless told otherwise
_AUX = {"inception_v3": {"aux_logits": False, "init_weights": True},
        "googlenet": {"aux_logits": False, "init_weights": True}}


def _error(msg: str) -> Exception:
    from cnnlab.models import ModelConfigError

    return ModelConfigError(msg)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def set_in_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d with one taking `in_channels` (same kernel, stride, padding, bias)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise _error(f"cannot adapt {type(model).__name__} to {in_channels} input channels: it has no Conv2d")


def _torchvision(arch: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)  # classification models only
    if arch not in known:
        raise _error(f"model.name='torchvision:{arch}': not a torchvision classification model."
                     f"{_suggest(arch, known)} See torchvision.models.list_models().")
    kwargs = {**_AUX.get(arch, {}), **kwargs}
    try:
        model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise _error(f"model 'torchvision:{arch}' refuses options {sorted(kwargs)}: {e}") from None
    if in_channels != 3:
        set_in_channels(model, in_channels)
    return model


def _timm(arch: str, num_classes: int, in_channels: int, kwargs: dict, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise _error(f"model.name='timm:{arch}' needs timm, which is not installed: "
                     "pip install timm (or pip install 'cnnlab[timm]')") from None
    if not timm.is_model(arch):
        raise _error(f"model.name='timm:{arch}': timm has no such model.{_suggest(arch, timm.list_models())}")
    if "dropout" in kwargs:
        kwargs["drop_rate"] = kwargs.pop("dropout")
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as e:
        raise _error(f"model 'timm:{arch}' refuses options {sorted(kwargs)}: {e}") from None


def build(name: str, *, num_classes: int, in_channels: int, mcfg) -> nn.Module:
    """`torchvision:<name>` or `timm:<name>` with `model.options` passed to the library's constructor."""
    source, arch = library_of(name)
    for key in ("batchnorm", "padding", "layers"):
        if getattr(mcfg, key, None) is not None:
            raise _error(f"model.{key}={getattr(mcfg, key)!r}: model {name!r} has no such option "
                         "(its constructor's own arguments go under model.options)")
    kwargs = dict(mcfg.options)
    if mcfg.dropout is not None:
        kwargs["dropout"] = mcfg.dropout
    if not arch:
        raise _error(f"model.name={name!r}: give the architecture after the colon, e.g. {source}:resnet50")
    if source == "torchvision":
        return _torchvision(arch, num_classes, in_channels, kwargs)
    if source == "timm":
        pretrained = str(mcfg.pretrained or "").lower() in ("timm", "default", "true")
        return _timm(arch, num_classes, in_channels, kwargs, pretrained)
    raise _error(f"model.name={name!r}: the prefix must be torchvision: or timm:")
