"""The data-set registry, a leaf: data-set files import it, nothing here imports them."""
from __future__ import annotations

from cnnlab.registry import Registry

DATASETS = Registry("data set")
