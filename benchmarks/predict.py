"""Inference speed, in one run: `cnnlab predict` on the CIFAR-10 JPEG zip against a hand-written torchvision
script doing the same, and ONNX Runtime against eager PyTorch for the four-conv net and ResNet-18.

    python benchmarks/predict.py [--limit 50000] [--run RUN_DIR] [--rounds 2]

1. Predict throughput (images/s, whole processes, start-up included, A B A B): `cnnlab predict RUN zip
   --out p.csv` (reads the zip, decodes in threads, normalises per batch) against a plain script:
   torchvision ImageFolder over the same images unpacked + Compose(ToTensor(), Normalize()) +
   DataLoader(batch 256, 2 workers) + the same model + softmax + a CSV of the top class. Without --run, a
   four-conv run is trained first for one short epoch (throughput does not depend on accuracy).
2. ONNX Runtime vs eager PyTorch (CPU, float32, 3x32x32, 10 classes): median latency at batch 1 and
   throughput at batch 256, for cifar_convnet and resnet18.
Ratios are the point: absolute numbers on a shared machine are noise.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import torch

from common import ROOT, cifar_zip, extracted_cifar, machine

PLAIN = textwrap.dedent("""
    import csv, json, sys, torch, torchvision, torchvision.transforms as T
    from torch.utils.data import DataLoader, Subset
    from cnnlab.deploy.classifier import read_run, build_model
    run_dir, folder, limit, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    run = read_run(run_dir)  # the model and its mean/std; everything else by hand
    model = build_model(run)
    tf = T.Compose([T.Resize((run.size, run.size)), T.ToTensor(), T.Normalize(run.mean, run.std)])
    ds = torchvision.datasets.ImageFolder(folder, transform=tf)
    ds = Subset(ds, range(min(limit, len(ds))))
    dl = DataLoader(ds, batch_size=256, num_workers=2)
    paths = [p for p, _ in ds.dataset.samples]
    i = 0
    with open(out, "w", newline="") as f, torch.no_grad():
        w = csv.writer(f)
        w.writerow(["path", "class_1", "prob_1"])
        for x, _ in dl:
            p = model(x).softmax(1)
            conf, pred = p.max(1)
            for c, k in zip(conf.tolist(), pred.tolist()):
                w.writerow([paths[i], run.classes[k], f"{c:.8f}"])
                i += 1
    print(i)
""")


def train_run(out: Path) -> Path:
    import cnnlab

    cfg = {"data": {"name": "folder", "root": str(cifar_zip()), "val_split": 500, "limit_train": 2000,
                    "loader": "stream", "check": False},
           "model": {"name": "cifar_convnet"}, "optim": {"name": "sgd", "lr": 0.02}, "schedule": {"name": "none"},
           "train": {"epochs": 1, "batch_size": 128, "progress": "off"},
           "output": {"dir": str(out), "name": "predict-bench", "report": False}}
    return cnnlab.train(cfg, quiet=True).dir


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                 "PYTHONPATH": str(ROOT / "src")})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def predict_throughput(run_dir: Path, limit: int, rounds: int, tmp: Path) -> None:
    zpath = cifar_zip()
    with zipfile.ZipFile(zpath) as z:
        members = sorted(n for n in z.namelist() if n.lower().endswith(".jpg"))
    n = min(limit, len(members))
    if n < len(members):  # the first n images in ImageFolder's order (class folders, then names)
        inputs = [f"{zpath}::{m}" for m in members[:n]]
    else:
        inputs = [str(zpath)]
    folder = extracted_cifar()
    cnn = [sys.executable, "-m", "cnnlab", "predict", str(run_dir), *inputs, "--out", str(tmp / "cnnlab.csv")]
    plain = [sys.executable, "-c", PLAIN, str(run_dir), str(folder), str(n), str(tmp / "plain.csv")]
    # peak memory (max RSS of the child processes so far): a 2,000-image predict, then the full one, before
    # any run of the plain script (whose DataLoader workers would count too)
    small = [sys.executable, "-m", "cnnlab", "predict", str(run_dir), *[f"{zpath}::{m}" for m in members[:2000]],
             "--out", str(tmp / "small.csv")]
    timed(small)
    rss_small = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    a, b = [], []
    for i in range(rounds):
        a.append(timed(cnn))
        if i == 0:
            rss_full = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        b.append(timed(plain))
    print(f"peak memory of cnnlab predict: {rss_small:,.0f} MiB for 2,000 images, {rss_full:,.0f} MiB for {n:,}")
    ra, rb = n / min(a), n / min(b)
    print(f"predict {n} CIFAR-10 JPEGs (best of {rounds}, whole process): cnnlab predict {ra:,.0f} img/s "
          f"({min(a):.1f} s), torchvision ImageFolder+DataLoader script {rb:,.0f} img/s ({min(b):.1f} s); "
          f"ratio {ra / rb:.2f}x")
    import csv

    with open(tmp / "cnnlab.csv") as f1, open(tmp / "plain.csv") as f2:
        c1 = {Path(r["path"].split("::")[-1]).as_posix(): r["class_1"] for r in csv.DictReader(f1)}
        c2 = {Path(r["path"]).relative_to(folder.parent).as_posix(): r["class_1"] for r in csv.DictReader(f2)}
    same = sum(c1.get(k) == v for k, v in c2.items())
    print(f"  same top-1 on {same}/{len(c2)} images (the plain script resizes through torchvision, cnnlab through "
          f"the run's own decode)")


def onnx_vs_eager(rounds: int, tmp: Path) -> None:
    import onnxruntime as ort

    from cnnlab import config as C
    from cnnlab.deploy.export import to_onnx
    from cnnlab.models import build_model

    for name in ("cifar_convnet", "resnet18"):
        torch.manual_seed(0)
        model = build_model(C.load(None, [f"model.name={name}"]).model, num_classes=10, in_channels=3,
                            input_size=32).eval()
        path = tmp / f"{name}.onnx"
        to_onnx(model, torch.randn(2, 3, 32, 32), path, dynamic_batch=True, opset=None, meta={"model": name})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        iname = sess.get_inputs()[0].name
        runs = {"eager": lambda x: model(x), "onnxruntime": lambda x: sess.run(None, {iname: x.numpy()})[0]}
        res = {}
        for what, fn in runs.items():
            x1, x256 = torch.randn(1, 3, 32, 32), torch.randn(256, 3, 32, 32)
            with torch.no_grad():
                for _ in range(10):
                    fn(x1)
                lat = []
                for _ in range(200 * rounds):
                    t = time.perf_counter()
                    fn(x1)
                    lat.append(time.perf_counter() - t)
                fn(x256)
                thr = []
                for _ in range(3 * rounds):
                    t = time.perf_counter()
                    fn(x256)
                    thr.append(256 / (time.perf_counter() - t))
            res[what] = (statistics.median(lat) * 1e3, max(thr))
        (le, te), (lo, to) = res["eager"], res["onnxruntime"]
        print(f"{name}: batch 1 latency eager {le:.2f} ms, onnxruntime {lo:.2f} ms ({le / lo:.2f}x); "
              f"batch 256 throughput eager {te:,.0f} img/s, onnxruntime {to:,.0f} img/s ({to / te:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50_000, help="images to predict (default: all 50,000)")
    ap.add_argument("--run", help="a trained run folder on 3x32x32 images (default: train one first)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-onnx", action="store_true")
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        run_dir = Path(args.run) if args.run else train_run(tmp / "runs")
        if not args.run:
            print(f"trained a one-epoch cifar_convnet run on 2,000 images in {time.perf_counter() - t:.0f} s")
        predict_throughput(run_dir, args.limit, args.rounds, tmp)
        if not args.skip_onnx:
            onnx_vs_eager(args.rounds, tmp)


if __name__ == "__main__":
    main()
