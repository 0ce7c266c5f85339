"""Validation accuracy of trained runs' best checkpoints under each test-time augmentation: none, flip
(the mean of the image and its mirror) and airbench's (mirror x {none, two 1-pixel reflect-padded shifts},
weights 0.25 / 0.125). Separates what a recipe's training gains from what its TTA adds, on the same weights.

    python benchmarks/tta.py RUN_DIR [RUN_DIR ...]

One line a run: `RUN none 0.8798 flip 0.8846 airbench 0.8876` (the run's own evaluation split). Each mode is
a `cnnlab eval` of the run (`training.evaluate.evaluate_run`), so its files land in RUN/evals/<n>/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

MODES = ("none", "flip", "airbench")


def accuracies(run: Path) -> dict[str, float]:
    from cnnlab.training.evaluate import evaluate_run

    return {mode: evaluate_run(run, tta=mode)["test"]["accuracy"] for mode in MODES}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args(argv)
    for run in a.runs:
        acc = accuracies(run)
        print(run, *(f"{m} {acc[m]:.4f}" for m in MODES), flush=True)


if __name__ == "__main__":
    main()
