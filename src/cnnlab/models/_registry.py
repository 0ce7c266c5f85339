"""The model registry, a leaf (timm's `_registry.py`): model files import it, nothing here imports them.

Also the one reader of library-prefixed names: `torchvision:<arch>` and `timm:<arch>` are built by
models/external.py, every other name is a registered builder.
"""
from __future__ import annotations

from cnnlab.registry import Registry


def _library_names(name: str) -> list[str]:
    """`resnet50` is not cnnlab's, but torchvision has it: suggest 'torchvision:resnet50'."""
    try:
        from torchvision import models as tvm

        return [f"torchvision:{name.lower()}"] if name.lower() in tvm.list_models() else []
    except Exception:  # an old torchvision without list_models: no suggestion
        return []


MODELS = Registry("model", elsewhere=_library_names)

LIBRARIES = ("torchvision", "timm")  # model.name prefixes: <library>:<architecture>


def library_of(name: str) -> tuple[str | None, str]:
    """('timm', 'resnet18') for 'timm:resnet18'; (None, name) for a model registered in MODELS."""
    library, sep, arch = str(name).partition(":")
    return (library, arch) if sep and library in LIBRARIES else (None, str(name))
