"""cnnlab's fast recipe against airbench94 on the same device, the same split, in the same run: fixed-length
runs over many seeds, timed the way airbench times itself, accuracy as the mean over seeds with its interval.

    python benchmarks/gpu.py [--seeds 10] [--epochs 10] [--airbench-epochs 9.9] [KEY=VALUE ...]
    python benchmarks/gpu.py --tiny      # CI: a few hundred digits images, 1 epoch, 2 seeds, small widths

What is timed (CUDA events on a GPU, perf_counter on the CPU), on both sides, as airbench94's `train` does:
the whitening layer's initialisation from training images, every training epoch, and the final evaluation
with test-time augmentation; not the per-epoch validation (airbench prints it outside its timed region;
cnnlab's side here does none), not logging, and not loading the data onto the device. cnnlab's steps are
`training.loop.train_one_epoch`, the function `cnnlab train` runs, reading its device-side sums only at each
epoch's end; what `fit` adds around it (per-epoch validation, checkpoints, history rows) is left out here as
airbench leaves its own out. A one-epoch warm-up run on each side (cuDNN autotuning, torch.compile) is not
counted.

Data: the CIFAR-10 training zip (45,000 train / 5,000 val, `data.val_split=5000`), decoded by cnnlab (its
cache). airbench is fed the same tensors: its `CifarLoader` reads `<dir>/train.pt` and `<dir>/test.pt`
(uint8 NHWC images, labels, classes), written here from cnnlab's train and val splits into a temporary
folder, so nothing downloads; its "test" accuracy is then accuracy on the same 5,000 validation images.
The train split is written in a seeded shuffled order, as CIFAR-10's own files are: airbench initialises
its whitening layer from the first 5,000 images, which in the class-by-class zip would be two classes.

airbench (`pip install "cnnlab[gpu-bench]"`, package airbench 0.1.8) runs only on CUDA: its network is made
with `.cuda()` and timed with `torch.cuda.Event`. Elsewhere its side is skipped with the reason printed;
the data handed to it is still read back through its own `CifarLoader` on the CPU, so the feed is checked.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cifar_zip, machine

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "cifar10-fast.yaml"
TINY = ["data.name=digits", "data.image_size=32", "data.channels=3", "data.val_split=100", "data.limit_train=300",
        "model.options.widths=[16,32,32]", "train.batch_size=64", "train.eval_batch_size=200"]


class Timer:
    """Seconds between `start` and `stop`: CUDA events on a GPU (as airbench), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.seconds = device.type == "cuda", 0.0

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            self.seconds = 1e-3 * self.a.elapsed_time(self.b)
        else:
            self.seconds = time.perf_counter() - self.t0


def run_cnnlab(cfg, splits, device, seed: int, epochs: int):
    """One fixed-length run of `cfg` with train.seed = `seed`: (timed seconds, final accuracy on the val split,
    the trained model). The weights are those `cnnlab train` ends with (tests/test_benchmarks.py)."""
    import dataclasses

    from cnnlab.config import tta_mode
    from cnnlab.data.loader import Batches, Normalizer, epoch_order
    from cnnlab.models import hooks
    from cnnlab.training import loop as T
    from cnnlab.training import loss as loss_mod
    from cnnlab.training.state import TrainState

    t = dataclasses.replace(cfg.train, seed=seed, epochs=epochs)
    cfg = dataclasses.replace(cfg, train=t)
    T.seed_everything(seed)
    model = T.build_for(cfg, splits).to(device)
    nb = dict(batch_size=t.batch_size, device=device, channels=splits.channels, size=splits.size)
    train_b = Batches(splits.train, drop_last=len(splits.train) > t.batch_size, **nb)  # the data on the device
    val_b = Batches(splits.val, **{**nb, "batch_size": t.eval_batch_size})
    channels_last = T.use_channels_last(cfg, model, device)
    normalize = Normalizer(splits.mean, splits.std, device, channels_last)
    weights = loss_mod.class_weights(cfg, splits.train.labels, splits.classes)
    steps = math.ceil(min(len(train_b), t.limit_batches or len(train_b)) / t.accumulate)
    with Timer(device) as timer:
        if hooks.needs_data(model):  # the whitening stem, from training images: timed, as airbench's
            hooks.init_from_data(model, normalize(T._init_sample(splits, train_b, seed).to(device, non_blocking=True)))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        ts = TrainState.build(cfg, model, steps_per_epoch=steps, device=device)
        net = torch.compile(model) if t.compile else model
        guard = _NoSignal()
        for epoch in range(epochs):
            ts.progress.epoch, ts.progress.batch_in_epoch = epoch, 0
            ts.progress.epoch_loss_sum, ts.progress.epoch_correct, ts.progress.epoch_seen = 0.0, 0, 0
            hooks.before_epoch(model, epoch)
            order = epoch_order(len(splits.train), seed, epoch)
            for _ in T.train_one_epoch(ts, net, train_b, order, normalize=normalize, cfg=cfg, guard=guard,
                                       weights=weights, read_at=lambda s: False):
                pass
            if ts.lookahead is not None:
                ts.lookahead.end_epoch(model)
        logits, targets = T.evaluate(ts.eval_model, val_b, normalize, device=device, dtype=ts.amp, tta=tta_mode(t))
    return timer.seconds, (logits.argmax(1) == targets).float().mean().item(), model


class _NoSignal:
    def code(self):
        return None


def write_airbench_data(splits, folder: Path, seed: int = 0) -> Path:
    """airbench's on-disk format (what its CifarLoader reads): <folder>/cifar10/{train,test}.pt, each
    {'images': uint8 (N, H, W, C), 'labels': int64 (N,), 'classes': [...]}; train shuffled (seeded)."""
    d = folder / "cifar10"
    d.mkdir(parents=True, exist_ok=True)
    perm = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))
    for name, s, order in (("train", splits.train, perm), ("test", splits.val, torch.arange(len(splits.val)))):
        images = s.images[order].permute(0, 2, 3, 1).contiguous()
        labels = torch.as_tensor(s.labels, dtype=torch.int64)[order]
        torch.save({"images": images, "labels": labels, "classes": list(splits.classes)}, d / f"{name}.pt")
    return d


def airbench_reason(device: torch.device, splits) -> str | None:
    """Why airbench's side cannot run here, or None."""
    try:
        import airbench  # noqa: F401
    except ImportError:
        return 'the airbench package is not installed (pip install "cnnlab[gpu-bench]")'
    if device.type != "cuda":
        return f"airbench94 needs CUDA (make_net94 calls .cuda(), it times with torch.cuda.Event); device is {device}"
    if len(splits.classes) != 10 or splits.channels != 3 or splits.size != 32:
        return "airbench94's network is for 10 classes of 3x32x32 images"
    return None


def check_airbench_feed(folder: Path, splits) -> str:
    """Read the written files back through airbench's own CifarLoader on the CPU and draw one batch."""
    from airbench import CifarLoader

    loader = CifarLoader(str(folder), train=True, batch_size=64, aug={"flip": True, "translate": 2}, altflip=True,
                         gpu="cpu")
    test = CifarLoader(str(folder), train=False, batch_size=64, gpu="cpu")
    x, y = next(iter(loader))
    assert len(loader.images) == len(splits.train) and len(test.images) == len(splits.val)
    assert tuple(x.shape[1:]) == (3, 32, 32) and sorted(test.labels.tolist()) == sorted(splits.val.labels.tolist())
    return f"airbench's CifarLoader read {len(loader.images)} train / {len(test.images)} test images (one batch drawn)"


def run_airbench(folder: Path, seed: int, epochs: float, *, warmup: bool = False) -> tuple[float, float]:
    """One airbench94 run on the written data (cwd = folder's parent: its train() opens 'cifar10/test.pt'):
    (airbench's own total_time_seconds, its tta_val_acc), parsed from its final printed row."""
    import airbench
    from airbench.lib_airbench94 import hyp

    torch.manual_seed(seed)
    loader = airbench.CifarLoader(str(folder), train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                                  altflip=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        airbench.train94(loader, epochs=epochs, run=-1 if warmup else seed, verbose=True)
    if warmup:
        return math.nan, math.nan
    return parse_airbench(out.getvalue())


def parse_airbench(printed: str) -> tuple[float, float]:
    """(total_time_seconds, tta_val_acc) from the table airbench's train() prints: its 'eval' row, the last
    but one line (columns run, epoch, train_loss, train_acc, val_acc, tta_val_acc, total_time_seconds)."""
    lines = printed.strip().splitlines()
    cols = [c.strip() for c in lines[-2].strip().strip("|").split("|")] if len(lines) >= 2 else []
    if len(cols) != 7 or cols[1] != "eval":
        raise SystemExit(f"cannot read airbench's final row (did its print format change?):\n{printed[-800:]}")
    return float(cols[6]), float(cols[5])


def summary(name: str, seconds: list[float], accs: list[float]) -> dict:
    from cnnlab.analysis.stats import describe

    t, a = describe(seconds), describe(accs)
    print(f"{name:>9}: n={a['n']}  accuracy {a['mean']:.4f} (95% CI {a['lo']:.4f}-{a['hi']:.4f}, sd {a['std']:.4f})"
          f"  time {t['mean']:.3f} s (95% CI {t['lo']:.3f}-{t['hi']:.3f})")
    return {"t": t, "a": a}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="runs per side, seeds 0..n-1 (default 10)")
    ap.add_argument("--epochs", type=int, default=10, help="cnnlab's epochs (fixed length)")
    ap.add_argument("--airbench-epochs", type=float, default=9.9, help="airbench94's train_epochs (its default 9.9)")
    ap.add_argument("--tiny", action="store_true", help="CI: digits at 32x32 RGB, 300 train / 100 val, small "
                    "widths, 1 epoch, 2 seeds (unless set)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--no-airbench", action="store_true", help="time cnnlab only")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of examples/cifar10-fast.yaml")
    a = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    from cnnlab import config as C
    from cnnlab import process
    from cnnlab.data.pipeline import prepare

    if a.tiny:
        a.seeds = a.seeds if "--seeds" in given else 2
        a.epochs = a.epochs if "--epochs" in given else 1
        a.airbench_epochs = a.airbench_epochs if "--airbench-epochs" in given else 1
        data = TINY
    else:
        data = ["data.name=folder", f"data.root={cifar_zip()}", "data.val_split=5000"]
    if a.seeds < 1 or a.epochs < 1:
        raise SystemExit("--seeds and --epochs must be >= 1")
    cfg = C.load(RECIPE, [*data, f"train.device={a.device}", "train.progress=off", *a.overrides])
    device = process.setup(cfg)
    splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {machine()}{gpu}; device {device}")
    print(f"data: {len(splits.train)} train / {len(splits.val)} val ({cfg.data.name}); cnnlab {a.epochs} epochs, "
          f"batch {cfg.train.batch_size}, widths {cfg.model.options.get('widths', '64/256/256 (default)')}, "
          f"tta {C.tta_mode(cfg.train)}; airbench94 {a.airbench_epochs} epochs; {a.seeds} seeds each")

    reason = "--no-airbench" if a.no_airbench else airbench_reason(device, splits)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cnnlab-airbench-") as tmp:
        folder = write_airbench_data(splits, Path(tmp)) if reason != "--no-airbench" else None
        if device.type == "cuda" or cfg.train.compile:  # warm-up (cuDNN autotuning, compilation), not counted
            run_cnnlab(cfg, splits, device, seed=0, epochs=1)
        seconds, accs = [], []
        for seed in range(a.seeds):
            s, acc, _ = run_cnnlab(cfg, splits, device, seed, a.epochs)
            seconds.append(s)
            accs.append(acc)
            print(f"  cnnlab   seed {seed}: {acc:.4f} in {s:.3f} s", flush=True)
        results["cnnlab"] = summary("cnnlab", seconds, accs)
        if reason is not None:
            print(f"airbench: skipped: {reason}")
            if folder is not None and reason.startswith("airbench94 needs CUDA"):
                print(f"airbench: data feed checked: {check_airbench_feed(folder, splits)}")
        else:
            here = os.getcwd()
            os.chdir(tmp)  # airbench's train() opens 'cifar10/test.pt' relative to the working directory
            try:
                run_airbench(folder, 0, a.airbench_epochs, warmup=True)
                seconds, accs = [], []
                for seed in range(a.seeds):
                    s, acc = run_airbench(folder, seed, a.airbench_epochs)
                    seconds.append(s)
                    accs.append(acc)
                    print(f"  airbench seed {seed}: {acc:.4f} in {s:.3f} s", flush=True)
            finally:
                os.chdir(here)
            results["airbench"] = summary("airbench", seconds, accs)
    if "airbench" in results:
        c, b = results["cnnlab"], results["airbench"]
        print(f"time ratio cnnlab / airbench94 = {c['t']['mean'] / b['t']['mean']:.2f}x (> 1: cnnlab slower); "
              f"accuracy difference cnnlab - airbench94 = {c['a']['mean'] - b['a']['mean']:+.4f}")


if __name__ == "__main__":
    main()
