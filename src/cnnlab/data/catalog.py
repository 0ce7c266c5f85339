"""The built-in data sets, registered (importing this module imports their files), and the name check
that runs before a run starts. `cnnlab.data.DATASETS` is this registry, filled."""
from __future__ import annotations

from cnnlab.config import ConfigError
from cnnlab.data import hf, manifest, official, sources  # noqa: F401  (each registers its data sets)
from cnnlab.data._registry import DATASETS

__all__ = ["DATASETS", "check_name"]


def check_name(name: str, key: str = "data.name") -> None:
    """Refuse an unknown data-set name, naming the key and the closest names (before any work)."""
    if name not in DATASETS:
        raise ConfigError(f"{key}={name!r}: {DATASETS.unknown_message(name)}")
