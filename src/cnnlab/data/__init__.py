"""Data sets by name (one registered function each), splits, statistics, checks and loaders."""
from cnnlab.registry import Registry

DATASETS = Registry("data set")

from cnnlab.data.base import DataSource, ImageSet  # noqa: E402
from cnnlab.data import sources  # noqa: E402,F401  (registers the built-in data sets)
from cnnlab.data import official  # noqa: E402,F401  (mnist, cifar10, stl10, svhn, mnist-m, ...)

__all__ = ["DATASETS", "DataSource", "ImageSet"]
