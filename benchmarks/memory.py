"""Host memory of the in-memory data path: CIFAR-10 (45,000 train / 5,000 val, uint8) resident, measured
as the process's resident set size before and after `prepare` and the first training batches, against
the raw size of the pixels (50,000 x 3 x 32 x 32 bytes = 146.5 MiB).

    python benchmarks/memory.py

Run it twice: the first run decodes the JPEGs and writes the uint8 cache; the second (the usual case)
loads the cache. Target: under 200 MB beyond the model.
"""
from __future__ import annotations

import resource
from pathlib import Path

import torch

from common import cifar_zip, machine


def rss_mib() -> float:
    """The current resident set size (not the peak), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    from cnnlab import config as C
    from cnnlab.data.loader import Batches, Normalizer, augment_batch, epoch_order
    from cnnlab.data.pipeline import prepare

    print(f"machine: {machine()}")
    cfg = C.load(None, ["data.name=folder", f"data.root={cifar_zip()}", "data.val_split=5000",
                        "data.augment.hflip=true", "data.augment.crop_padding=4"])
    torch.zeros(1)  # torch's own start-up allocations before the baseline
    before = rss_mib()
    splits = prepare(cfg.data)
    after_prepare = rss_mib()
    b = Batches(splits.train, batch_size=512, device=torch.device("cpu"), channels=3, size=32)
    norm = Normalizer(splits.mean, splits.std, "cpu", channels_last=True)
    for i, (x, _, _) in enumerate(b.iterate(epoch_order(len(splits.train), 0, 0))):
        norm(augment_batch(x, cfg.data.augment, torch.Generator().manual_seed(i)))
        if i == 20:
            break
    after_batches = rss_mib()
    raw = sum(s.images.numel() for s in (splits.train, splits.val) if s.images is not None) / 2**20
    print(f"pixels held: {raw:.1f} MiB (uint8)")
    print(f"resident after prepare: +{after_prepare - before:.1f} MiB; after 21 training batches of 512: "
          f"+{after_batches - before:.1f} MiB (target < 200 MB = 190.7 MiB)")
    print(f"peak resident set of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
