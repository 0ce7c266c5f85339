"""Wall time for cnnlab's fast CIFAR-10 recipe to reach 80%, 90% and 93% validation accuracy on the
CIFAR-10 training zip (45,000 train / 5,000 val), against the plain pipeline training the four-conv
net to its best, both measured in this run.

    python benchmarks/time_to_accuracy.py [--fast-epochs 10] [--plain-epochs 15] [--skip-plain] [KEY=VALUE ...]
    python benchmarks/time_to_accuracy.py --runs RUN_DIR [RUN_DIR ...]

KEY=VALUE overrides go to the fast recipe, e.g. "model.options.widths=[32,128,128]" for a narrower net.
--runs reads runs already trained (e.g. the seeds of `cnnlab train ... repeats=3`) instead of training:
for each run the epoch and the time at which its per-epoch validation first reached each target, then
over the runs the mean time with its 95% interval (where every run reached the target).

Time counts training and the per-epoch validation, not the one-off JPEG decode (cached on disk
after the first run) — the plain pipeline's decode is inside its epochs, as it is for its users.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cifar_zip, machine

TARGETS = (0.80, 0.90, 0.93)
ROOT = Path(__file__).resolve().parents[1]


def first_epoch(rows: list[tuple[float, float]], target: float) -> int | None:
    """The index of the first of rows (cumulative seconds, val acc) at or above target, or None."""
    return next((i for i, (_, a) in enumerate(rows) if a >= target), None)


def first_reach(rows: list[tuple[float, float]]) -> dict:
    """rows of (cumulative seconds, val acc) -> {target: seconds or None}."""
    return {t: None if (i := first_epoch(rows, t)) is None else rows[i][0] for t in TARGETS}


def run_fast(epochs: int, out: str, overrides: list[str]) -> list[tuple[float, float]]:
    import cnnlab

    run = cnnlab.train(ROOT / "examples" / "cifar10-fast.yaml",
                       ["data.name=folder", f"data.root={cifar_zip()}", "data.val_split=5000", f"train.epochs={epochs}",
                        f"output.dir={out}", "output.report=false", "train.progress=lines", *overrides])
    return history(run.dir)


def history(run_dir: Path) -> list[tuple[float, float]]:
    """A run's (cumulative seconds, val acc) per epoch, from its history.csv (training and per-epoch validation
    time; the final evaluation and the report are not in it)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no history.csv (not a cnnlab run folder, or no epoch finished)")
    total, rows = 0.0, []
    with open(path) as f:
        for r in csv.DictReader(f):
            total += float(r["seconds"])
            rows.append((total, float(r["val_acc"])))
    return rows


def final_evaluation(run: Path) -> str:
    """'; final evaluation ACC (tta MODE)' from the run's metrics.json and config.yaml, or '' before it ran. Its time
    (one pass over the evaluation split per TTA view) is not in history.csv."""
    import json

    from cnnlab import config as C
    from cnnlab.config.checks import tta_mode

    metrics = Path(run) / "metrics.json"
    if not metrics.is_file() or "test" not in (m := json.loads(metrics.read_text())):
        return ""
    tta = tta_mode(C.load(str(Path(run) / "config.yaml"), []).train)
    return f"; final evaluation {m['test']['accuracy']:.4f} (tta {tta})"


def report_runs(runs: list[Path]) -> None:
    from cnnlab.analysis.stats import describe

    reached: dict[float, list[float]] = {t: [] for t in TARGETS}
    for run in runs:
        rows = history(run)
        parts = []
        for t in TARGETS:
            i = first_epoch(rows, t)
            if i is not None:
                reached[t].append(rows[i][0])
            parts.append(f"{t:.0%} " + (f"epoch {i + 1} at {rows[i][0] / 60:.1f} min" if i is not None else "not reached"))
        best = max(a for _, a in rows)
        print(f"{run}: {', '.join(parts)}; best {best:.4f} of {len(rows)} epochs in {rows[-1][0] / 60:.1f} min"
              + final_evaluation(run))
    for t, secs in reached.items():
        if len(secs) == len(runs) and len(runs) > 1:
            d = describe([s / 60 for s in secs])
            print(f"{t:.0%}: n={d['n']}  mean {d['mean']:.1f} min (95% CI {d['lo']:.1f} to {d['hi']:.1f})")
        elif len(runs) > 1:
            print(f"{t:.0%}: reached by {len(secs)} of {len(runs)} runs")


def run_plain(epochs: int) -> list[tuple[float, float]]:
    """Course-style loop: ImageFolder + per-image PIL transforms + DataLoader, the four-conv net, SGD."""
    import torchvision
    import torchvision.transforms as T

    from common import extracted_cifar
    from throughput import MEAN, STD, make_model

    root = extracted_cifar()
    full = torchvision.datasets.ImageFolder(str(root))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(full), generator=g).tolist()
    train_idx, val_idx = perm[5000:], perm[:5000]
    tf_train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    tf_val = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    train = torch.utils.data.Subset(torchvision.datasets.ImageFolder(str(root), transform=tf_train), train_idx)
    val = torch.utils.data.Subset(torchvision.datasets.ImageFolder(str(root), transform=tf_val), val_idx)
    tl = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=2, persistent_workers=True)
    vl = torch.utils.data.DataLoader(val, batch_size=512, num_workers=2, persistent_workers=True)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, epochs=epochs, steps_per_epoch=len(tl))
    rows, total = [], 0.0
    for ep in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in tl:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in vl:
                correct += (model(x).argmax(1) == y).sum().item()
        total += time.perf_counter() - t0
        rows.append((total, correct / len(val)))
        print(f"plain epoch {ep + 1}: val acc {rows[-1][1]:.4f} at {total:.0f}s", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast-epochs", type=int, default=10)
    ap.add_argument("--plain-epochs", type=int, default=15)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--skip-fast", action="store_true", help="only the plain pipeline")
    ap.add_argument("--out", default="/tmp/cnnlab-bench")
    ap.add_argument("--runs", nargs="+", type=Path, metavar="RUN_DIR", help="read these trained runs instead of training")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of examples/cifar10-fast.yaml")
    a = ap.parse_args(argv)
    if a.runs:
        return report_runs(a.runs)
    print(f"machine: {machine()}")
    fast = [] if a.skip_fast else run_fast(a.fast_epochs, a.out, a.overrides)
    if fast:
        for t, s in first_reach(fast).items():
            print(f"cnnlab fast recipe: {t:.0%} val acc " + (f"after {s:.0f} s" if s else "not reached"))
        print(f"cnnlab fast recipe ({a.fast_epochs} epochs{', ' + ' '.join(a.overrides) if a.overrides else ''}): "
              f"history in {a.out}")
        print(f"cnnlab fast recipe: best {max(acc for _, acc in fast):.4f} in {fast[-1][0]:.0f} s")
    if not a.skip_plain:
        plain = run_plain(a.plain_epochs)
        best = max(a for _, a in plain)
        t_best = next(s for s, acc in plain if acc == best)
        print(f"plain pipeline: best {best:.4f} after {t_best:.0f} s")
        same = next((s for s, acc in fast if acc >= best), None)
        if same:
            print(f"cnnlab reaches the plain pipeline's best ({best:.4f}) after {same:.0f} s: {t_best / same:.1f}x sooner")


if __name__ == "__main__":
    main()
