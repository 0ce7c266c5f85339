"""Validation accuracy of trained runs' best checkpoints under each test-time augmentation: none, flip
(the mean of the image and its mirror) and airbench's (mirror x {none, two 1-pixel reflect-padded shifts},
weights 0.25 / 0.125). Separates what a recipe's training gains from what its TTA adds, on the same weights.

    python benchmarks/tta.py RUN_DIR [RUN_DIR ...]

One line a run: `RUN none 0.8798 flip 0.8846 airbench 0.8876` (the run's own evaluation split, as its
final evaluation and `cnnlab eval` use it).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

MODES = ("none", "flip", "airbench")


def accuracies(run: Path, device: str = "cpu") -> dict[str, float]:
    from cnnlab import config as C
    from cnnlab.data.pipeline import prepare
    from cnnlab.training import checkpoint as ckpt
    from cnnlab.training.loop import evaluate_weights

    cfg = C.load(str(run / "config.yaml"), [])
    splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
    weights = ckpt.load(run / "checkpoints" / "best.pt")["model"]
    out = {}
    for mode in MODES:
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tta=mode, tta_flip=False))
        logits, y = evaluate_weights(c, splits, weights, torch.device(device), source=run / "checkpoints" / "best.pt")
        out[mode] = (logits.argmax(1) == y).float().mean().item()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    for run in a.runs:
        acc = accuracies(run, a.device)
        print(run, *(f"{m} {acc[m]:.4f}" for m in MODES), flush=True)


if __name__ == "__main__":
    main()
