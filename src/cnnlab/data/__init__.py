"""Data sets by name (one registered function each), splits, statistics, checks and loaders.

Owns everything from files on disk to normalised batches. May import config, registry, errors and
dist; never training, models, analysis, report or studies. The registry is the leaf
`data/_registry.py` (data-set files import it); `data/catalog.py` imports the data-set files.
Importing the package itself is light (no torch), so `cnnlab data --help` is fast: `DATASETS`,
`DataSource` and `ImageSet` are loaded on first use.
"""
from __future__ import annotations

__all__ = ["DATASETS", "DataSource", "ImageSet"]


def __getattr__(name: str):
    if name == "DATASETS":
        from cnnlab.data.catalog import DATASETS

        return DATASETS
    if name in ("DataSource", "ImageSet"):
        from cnnlab.data import base

        return getattr(base, name)
    raise AttributeError(f"module 'cnnlab.data' has no attribute {name!r}")
