"""The quickstart on a shared machine: its wall time alone and beside two other PyTorch processes (each
multiplying matrices with PyTorch's default threads, as a second training or a parallel test worker
would), for PyTorch's own thread defaults ("old") and cnnlab's default thread policy ("new").

    python benchmarks/contention.py [--epochs 4] [--repeats 2]

"old" imports torch before cnnlab's entry point (so OpenMP keeps its spin-waiting default) and sets
train.threads to PyTorch's default count; "new" is `python -m cnnlab train` as a user runs it. Each line
prints the loaded/unloaded ratio of one policy; the target is loaded within 2.5x of unloaded. Runs
alternate old/new, alone/loaded, so a change in the machine's background load hits both policies.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
HOG = ("import sys, torch\n"
       "a = torch.randn(1024, 1024)\n"
       "print('ready', flush=True)\n"
       "while True:\n"
       "    a = (a @ a).clamp_(-1, 1)\n")
OLD = ("import sys, torch\n"  # torch (and its OpenMP runtime) loaded before cnnlab chooses anything
       "from cnnlab.cli import main\n"
       "sys.argv[0] = 'cnnlab'\n"
       "raise SystemExit(main(sys.argv[1:] + [f'train.threads={torch.get_num_threads()}']))\n")


def run_quickstart(policy: str, epochs: int, out: str) -> tuple[float, int]:
    """Seconds of one quickstart run (the whole process) and the torch threads it chose (its env.json)."""
    name = f"q{len(os.listdir(out))}"
    args = ["train", str(QUICKSTART), f"train.epochs={epochs}", f"output.dir={out}", f"output.name={name}",
            "output.report=false", "train.progress=off"]
    cmd = [sys.executable, "-c", OLD, *args] if policy == "old" else [sys.executable, "-m", "cnnlab", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((Path(out) / name / "env.json").read_text())["torch_threads"]


def start_hogs(n: int) -> list[subprocess.Popen]:
    hogs = [subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for h in hogs:
        h.stdout.readline()  # 'ready': torch imported, multiplying
    return hogs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hogs", type=int, default=2)
    args = ap.parse_args()
    import torch

    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} default threads, "
          f"load average {os.getloadavg()[0]:.2f} at start; quickstart, {args.epochs} epochs", flush=True)
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.repeats):
            for policy in ("old", "new"):
                for load in ("alone", "loaded"):
                    hogs = start_hogs(args.hogs) if load == "loaded" else []
                    try:
                        s, threads = run_quickstart(policy, args.epochs, out)
                    finally:
                        for h in hogs:
                            h.kill()
                            h.wait()
                    times.setdefault((policy, load), []).append(s)
                    print(f"  repeat {r + 1}: {policy:3s} {load:6s} {s:6.1f} s  ({threads} torch thread"
                          f"{'s' * (threads > 1)})", flush=True)
    for policy in ("old", "new"):
        a, b = (statistics.median(times[policy, k]) for k in ("alone", "loaded"))
        print(f"{policy}: alone {a:.1f} s, beside {args.hogs} PyTorch processes {b:.1f} s: {b / a:.1f}x "
              f"(median of {args.repeats}; target <= 2.5x)")


if __name__ == "__main__":
    main()
