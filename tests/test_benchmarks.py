"""benchmarks/gpu.py end to end on the CPU with its tiny setting (CI): both sides' code paths run, cnnlab's
runs are timed and summarised over seeds, and the data written for airbench reads back through airbench's
own loader (its training needs CUDA, so that side says it was skipped and why)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_runs_on_the_cpu(capsys):
    """In this process (an interpreter start with torch, torchvision and scikit-learn costs more than the run);
    `python benchmarks/gpu.py --tiny` is the same `main`."""
    gpu = gpu_module()
    n = torch.get_num_threads()
    capsys.readouterr()
    try:
        gpu.main(["--tiny", "--device", "cpu"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    runs = re.findall(r"cnnlab   seed (\d): (\d\.\d{4}) in (\d+\.\d{3}) s", out)
    assert [s for s, _, _ in runs] == ["0", "1"], out
    assert all(0.0 <= float(a) <= 1.0 and float(t) > 0 for _, a, t in runs)
    mean = sum(float(a) for _, a, _ in runs) / 2
    assert re.search(rf"cnnlab: n=2  accuracy {mean:.4f} \(95% CI ", out), out  # the mean of the seeds' runs
    assert "300 train / 100 val" in out
    if importlib.util.find_spec("airbench") is not None:
        assert "airbench: skipped: airbench94 needs CUDA" in out, out
        assert "airbench's CifarLoader read 300 train / 100 test images" in out, out
    else:
        assert "airbench: skipped: the airbench package is not installed" in out, out


def gpu_module():
    return bench_module("gpu")


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_throughput_of_the_fast_net_runs_end_to_end_on_a_small_zip(tmp_path, monkeypatch, capsys):
    """`benchmarks/throughput.py --model fastnet` on a zip in the CIFAR-10 zip's layout: the plain pipeline,
    the fast recipe and the recipe before issue #16's details are each timed, and the ratios printed."""
    import zipfile

    import numpy as np
    from PIL import Image

    from cnnlab import config as C
    from cnnlab.data.pipeline import prepare

    rng = np.random.default_rng(0)
    zpath = tmp_path / "cifar.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for c in range(10):
            for i in range(42):  # 420 images: 5 training batches of 64 (3 warm-up + 2 timed) and 100 for val
                img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                with z.open(f"train/class{c}/{i:04d}.jpg", "w") as f:
                    img.save(f, format="JPEG")
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    tp, common = bench_module("throughput"), bench_module("common")
    monkeypatch.setattr(common, "ZIP", zpath)
    splits = prepare(C.load(None, ["data.name=folder", f"data.root={zpath}", "data.val_split=100"]).data)
    n = torch.get_num_threads()
    capsys.readouterr()
    try:
        tp.main_fast(SimpleNamespace(widths=[8, 8, 8], batches=2, rounds=1, batch=64), splits)
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert re.search(r"round 1: plain \d+ img/s, cnnlab fast recipe \d+ img/s, the recipe before #16's details "
                     r"\d+ img/s", out), out
    assert re.search(r"ratio cnnlab/plain = \d+\.\d\dx \(before: \d+\.\d\dx\); now/before \d+\.\d\dx "
                     r"\(fast net 8/8/8, batch 64, fp32\)", out), out


def test_the_benchmark_trains_exactly_what_cnnlab_train_trains(tmp_path):
    """The benchmark times train_one_epoch without fit's validation, checkpoints and logs: the weights it ends
    with and its final (TTA) accuracy are those of `cnnlab train` on the same config."""
    import cnnlab
    from cnnlab import config as C
    from cnnlab.data.pipeline import prepare
    from cnnlab.training import checkpoint as ckpt
    from cnnlab.training.loop import evaluate_weights

    gpu = gpu_module()
    overrides = [*gpu.TINY, "train.device=cpu", "train.progress=off", "train.threads=1", "train.epochs=2",
                 "train.seed=1", f"output.dir={tmp_path}", "output.report=false"]
    n = torch.get_num_threads()
    try:
        run = cnnlab.train(gpu.RECIPE, overrides, quiet=True)
        cfg = C.load(gpu.RECIPE, overrides)
        splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
        seconds, acc, model = gpu.run_cnnlab(cfg, splits, torch.device("cpu"), seed=1, epochs=2)
    finally:
        torch.set_num_threads(n)
    last = ckpt.load(run.dir / "checkpoints" / "last.pt")["model"]
    sd = model.state_dict()
    assert seconds > 0 and sorted(last) == sorted(sd)
    assert all(torch.equal(last[k], sd[k]) for k in last), [k for k in last if not torch.equal(last[k], sd[k])]
    logits, targets = evaluate_weights(cfg, splits, last, torch.device("cpu"))
    assert acc == (logits.argmax(1) == targets).float().mean().item()


def test_the_airbench_result_is_read_from_airbench_s_own_printed_table(capsys):
    pytest.importorskip("airbench")
    from airbench.utils import print_training_details

    gpu = gpu_module()
    capsys.readouterr()
    print_training_details({"run": 3, "epoch": 9, "train_loss": 0.9, "train_acc": 0.8, "val_acc": 0.93}, False)
    print_training_details({"epoch": "eval", "tta_val_acc": 0.9412, "total_time_seconds": 3.8312}, True)
    assert gpu.parse_airbench(capsys.readouterr().out) == (3.8312, 0.9412)
    with pytest.raises(SystemExit, match="cannot read airbench's final row"):
        gpu.parse_airbench("| 0 | 1 |\n")


def test_tta_benchmark_reads_a_run_and_agrees_with_its_final_evaluation(tmp_path, capsys):
    """`benchmarks/tta.py RUN`: the accuracy under the run's own TTA (flip) is the one its final evaluation wrote
    to metrics.json, and without TTA the one its epoch's validation (no TTA) wrote to history.csv: the same
    weights under each mode."""
    import json

    import cnnlab

    overrides = [*bench_module("gpu").TINY, "train.device=cpu", "train.progress=off", "train.threads=1",
                 "train.epochs=1", "train.tta=flip", f"output.dir={tmp_path}", "output.report=false"]
    n = torch.get_num_threads()
    try:
        run = cnnlab.train(str(ROOT / "examples" / "cifar10-fast.yaml"), overrides, quiet=True)
        capsys.readouterr()
        bench_module("tta").main([str(run.dir)])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    m = re.fullmatch(rf"{re.escape(str(run.dir))} none (\d\.\d{{4}}) flip (\d\.\d{{4}}) airbench (\d\.\d{{4}})\n", out)
    assert m, out
    final = json.loads((run.dir / "metrics.json").read_text())["test"]["accuracy"]
    epoch = float((run.dir / "history.csv").read_text().splitlines()[1].split(",")[4])  # val_acc, no TTA
    none, flip = float(m.group(1)), float(m.group(2))
    assert flip == pytest.approx(final, abs=5e-5) and none == pytest.approx(epoch, abs=5e-5)
    assert none != flip  # (so the two checks above tell the modes apart)


def test_time_to_accuracy_reads_trained_runs_and_times_each_target_from_their_history(tmp_path, capsys, monkeypatch):
    """`benchmarks/time_to_accuracy.py --runs RUN...`: per run, the first epoch whose validation reached each target
    and the training time summed up to it from history.csv, then the final evaluation's accuracy (with the run's TTA);
    over the runs, the mean time where all reached it."""
    import csv
    import json

    import cnnlab

    overrides = [*bench_module("gpu").TINY, "train.device=cpu", "train.progress=off", "train.threads=1",
                 "train.epochs=2", f"output.dir={tmp_path}", "output.report=false"]
    n = torch.get_num_threads()
    try:
        run = cnnlab.train(str(ROOT / "examples" / "cifar10-fast.yaml"), overrides, quiet=True)
    finally:
        torch.set_num_threads(n)
    rows = list(csv.DictReader(open(run.dir / "history.csv")))
    acc = [float(r["val_acc"]) for r in rows]
    secs = [float(r["seconds"]) for r in rows]
    bench = bench_module("time_to_accuracy")
    # the second epoch's accuracy as a target: reached at epoch 2 unless epoch 1 was already as good
    first = 1 if acc[0] >= acc[1] else 2
    monkeypatch.setattr(bench, "TARGETS", (acc[1], 1.5))
    capsys.readouterr()
    bench.main(["--runs", str(run.dir), str(run.dir)])
    out = capsys.readouterr().out.splitlines()
    at = sum(secs[:first]) / 60
    final = json.loads((run.dir / "metrics.json").read_text())["test"]["accuracy"]
    line = (f"{run.dir}: {acc[1]:.0%} epoch {first} at {at:.1f} min, 150% not reached; "
            f"best {max(acc):.4f} of 2 epochs in {sum(secs) / 60:.1f} min; final evaluation {final:.4f} (tta airbench)")
    assert out[:2] == [line, line], out
    assert out[2].startswith(f"{acc[1]:.0%}: n=2  mean {at:.1f} min (95% CI "), out
    assert out[3] == "150%: reached by 0 of 2 runs", out
    with pytest.raises(SystemExit, match="no history.csv"):
        bench.main(["--runs", str(tmp_path)])
