"""On a GPU: wall time for cnnlab's fast recipe to reach 94% validation accuracy on CIFAR-10, against
airbench's published 2.59 s on an A100 (airbench94_muon in KellerJordan/cifar10-airbench; airbench94
itself is 3.83 s, 3.29 s compiled, 0.36 PFLOPs). The ratio printed is published / measured (> 1 means
faster than the published number; different GPUs differ).

    python benchmarks/gpu.py [--epochs 10] [--target 0.94] [KEY=VALUE ...]

Data: the CIFAR-10 training zip in ../shared (45,000 train / 5,000 val; airbench measures on the
official 10,000 test images, which are not here). Time counts the training epochs and the per-epoch
validation from history.csv, not the one-off decode into the cache, as airbench's does not count
loading the data onto the GPU. Exits 0 with a message when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from common import cifar_zip, machine

PUBLISHED_S = 2.59  # airbench94_muon on an A100 (the airbench README)
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.94)
    ap.add_argument("--out", default="/tmp/cnnlab-gpu-bench")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of examples/cifar10-fast.yaml")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (nothing measured)")
        sys.exit(0)
    import cnnlab

    print(f"machine: {machine()}, {torch.cuda.get_device_name()}")
    common = ["data.name=folder", f"data.root={cifar_zip()}", "data.val_split=5000", "train.device=cuda",
              f"output.dir={a.out}", "output.report=false", "train.progress=lines"]
    # a one-epoch warm-up run decodes the cache and warms up cuDNN autotuning and (with compile) the kernels
    cnnlab.train(ROOT / "examples" / "cifar10-fast.yaml", [*common, "train.epochs=1", *a.overrides], quiet=True)
    run = cnnlab.train(ROOT / "examples" / "cifar10-fast.yaml", [*common, f"train.epochs={a.epochs}", *a.overrides])
    total, reached = 0.0, None
    with open(run.dir / "history.csv") as f:
        for r in csv.DictReader(f):
            total += float(r["seconds"])
            if reached is None and float(r["val_acc"]) >= a.target:
                reached = (int(r["epoch"]), total, float(r["val_acc"]))
    if reached is None:
        print(f"{a.target:.0%} not reached in {a.epochs} epochs ({total:.2f} s); history in {run.dir}")
        return
    epoch, seconds, acc = reached
    print(f"cnnlab fast recipe: {acc:.4f} val acc at epoch {epoch}, {seconds:.2f} s of training + validation")
    print(f"airbench94 published: {PUBLISHED_S} s (A100); ratio published/cnnlab = {PUBLISHED_S / seconds:.2f}x")


if __name__ == "__main__":
    main()
