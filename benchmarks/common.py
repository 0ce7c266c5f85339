"""Shared pieces of the benchmarks: where the CIFAR-10 zip is, and an extracted copy for ImageFolder."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZIP = Path(os.environ.get("CNNLAB_CIFAR_ZIP", ROOT.parent / "shared" / "datasets" / "cifar10-jpeg-train.zip"))


def cifar_zip() -> Path:
    if not ZIP.is_file():
        raise SystemExit(f"benchmark needs the CIFAR-10 JPEG zip at {ZIP} (set CNNLAB_CIFAR_ZIP)")
    return ZIP


def extracted_cifar() -> Path:
    """The zip unpacked once under <cache>/cifar10-jpeg (the plain pipeline reads files)."""
    from cnnlab.data.base import cache_dir
    from cnnlab.data.download import safe_extract

    dest = cache_dir() / "cifar10-jpeg"
    if not (dest / ".done").exists():

        safe_extract(cifar_zip(), dest)
        (dest / ".done").touch()
    return dest / "train"


def machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"

