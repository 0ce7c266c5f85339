"""torchrun on CPU (gloo): 2 processes train the same weights as 1 with the same global batch, evaluate
every sample exactly once, write each file once; a failure on one rank ends both promptly.

Failures are planted through a test-only plugin, `plant.py`, written by the test: it registers a
model that raises (or returns NaN) at its k-th training call on one rank, then runs the cnnlab CLI.
torchrun runs it as the script (`torchrun ... plant.py train CONFIG`); the product has no debug knob.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cnnlab.training import checkpoint as ckpt
from cnnlab import cli
from cnnlab.data.loader import eval_indices

REPO = Path(__file__).resolve().parents[1]

# Every torchrun of this module on one xdist worker, one after another (pyproject: --dist loadgroup): two
# concurrent torchruns race for free ports, and the module's fixture is then built once.
pytestmark = pytest.mark.xdist_group("torchrun")

# No BatchNorm, no dropout: 2 ranks then compute exactly what 1 process computes (up to float sums).
# Batch 63 splits 32 + 31 over 2 ranks; 215 validation and 359 test images do not split evenly either.
CONFIG = {
    "data": {"name": "digits", "val_split": 215, "test_split": 0.2, "augment": {"crop_padding": 1, "hflip": True}},
    "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine"},
    "train": {"epochs": 2, "batch_size": 63, "seed": 3, "progress": "off", "threads": 1,
              "checkpoint_every_steps": 10},
    "output": {"report": False, "name": "ddp"},
}

# The training knobs that must stay exact under torchrun, on in the 1-process vs 2-process comparison and its
# resume: class-balanced draws (each rank its slice of one drawn order), class weights (each slice's loss over
# the global step's total weight), and accumulation (3 micro-batches of 21 = the steps of 63 above, DDP syncing
# only the last; 57 micro-batches = 19 steps an epoch, as 1,222 // 63).
KNOBS = {"data.sampler": "balanced", "train.class_weights": "balanced", "train.accumulate": 3, "train.batch_size": 21,
         "train.limit_batches": 57}

PLANT = '''
"""Test-only plugin: a model that fails on one rank at its k-th training call; then the cnnlab CLI."""
import os
import sys
import time

from torch import nn

from cnnlab.models import MODELS


class Planted(nn.Module):
    def __init__(self, num_classes, in_channels, input_size, rank, at, what):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * input_size * input_size, num_classes))
        self.rank, self.at, self.what, self.calls = rank, at, what, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at and int(os.environ.get("RANK", 0)) == self.rank:
                if self.what == "raise":
                    print(f"planted failure at {time.time()}", file=sys.stderr, flush=True)
                    raise RuntimeError(f"planted failure on rank {self.rank} at training call {self.calls}")
                return out * float("nan")
        return out


@MODELS.register("planted")
def planted(*, num_classes, in_channels, input_size, rank: int = 1, at: int = 3, what: str = "raise"):
    return Planted(num_classes, in_channels, input_size, rank, at, what)


if __name__ == "__main__":
    from cnnlab.cli import main

    sys.exit(main())
'''


def torchrun(args: list[str], timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        # --standalone picks a free port, which another process on a busy machine may take first: retry
        # that once (an environment race, not a cnnlab failure); any other failure is the test's to judge
        if "address already in use" not in r.stderr.lower():
            break
    return r, time.perf_counter() - t0


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_config(folder: Path, **over) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["output"]["dir"] = str(folder / "runs")
    for k, v in over.items():
        section, key = k.split(".")
        cfg[section][key] = v
    path = folder / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config (with KNOBS) trained by 1 process (in this one) and by 2 under torchrun (data.prefetch on)."""
    one = tmp_path_factory.mktemp("one")
    n_threads = torch.get_num_threads()
    try:
        assert cli.main(["train", str(write_config(one, **KNOBS))]) == 0
    finally:
        torch.set_num_threads(n_threads)
    two = tmp_path_factory.mktemp("two")
    # the 2-process run also augments one batch ahead in each rank's own thread (training/feed.py): the same
    # batches as the 1-process run's synchronous path, and the SIGTERM run's below
    r, seconds = torchrun(["-m", "cnnlab", "train", str(write_config(two, **KNOBS, **{"data.prefetch": "on"}))])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    print(f"\n2-process torchrun run: {seconds:.1f} s")
    return one / "runs", two / "runs", r


def test_two_processes_train_the_weights_of_one(runs):
    one, two, _ = runs
    a, b = ckpt.load(one / "ddp/checkpoints/last.pt"), ckpt.load(two / "ddp/checkpoints/last.pt")
    assert a["state"]["step"] == b["state"]["step"] == 2 * (1222 // 63)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=0), k
    h1, h2 = rows(one / "ddp/history.csv"), rows(two / "ddp/history.csv")
    for r1, r2 in zip(h1, h2, strict=True):
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), abs=1e-5)
        assert r1["train_acc"] == r2["train_acc"]


def test_evaluation_counts_every_sample_once_and_matches_one_process(runs):
    one, two, _ = runs
    h1, h2 = rows(one / "ddp/history.csv"), rows(two / "ddp/history.csv")
    for r1, r2 in zip(h1, h2, strict=True):
        assert r1["val_acc"] == r2["val_acc"]  # 215 validation images, 108 + 107 over the ranks
        assert float(r1["val_loss"]) == pytest.approx(float(r2["val_loss"]), abs=1e-5)
    m1 = json.loads((one / "ddp/metrics.json").read_text())
    m2 = json.loads((two / "ddp/metrics.json").read_text())
    assert m1["test"]["accuracy"] == m2["test"]["accuracy"]
    assert m1["test"]["confusion"] == m2["test"]["confusion"]
    assert m2["test"]["n"] == 359 and sum(map(sum, m2["test"]["confusion"])) == 359
    p = rows(two / "ddp/predictions.csv")
    assert [int(r["index"]) for r in p] == list(range(359))
    assert [r["id"] for r in p] == [r["id"] for r in rows(one / "ddp/predictions.csv")]


def test_only_rank_0_writes_and_each_file_once(runs):
    one, two, r = runs
    assert [p.name for p in two.iterdir()] == ["ddp"]  # one run folder
    hist = rows(two / "ddp/history.csv")
    assert [int(h["epoch"]) for h in hist] == [1, 2]  # no row written twice
    steps = [int(s["step"]) for s in rows(two / "ddp/steps.csv")]
    assert steps == sorted(set(steps)) == [int(s["step"]) for s in rows(one / "ddp/steps.csv")]
    assert r.stdout.count("run folder:") == 1 and r.stdout.count("best epoch") == 1
    assert not list(two.rglob("*.tmp"))


def test_eval_blocks_cover_every_index_once():
    for n in (0, 1, 2, 7, 215, 359, 1000):
        for world in (1, 2, 3, 8):
            blocks = [eval_indices(n, r, world) for r in range(world)]
            assert torch.cat(blocks).tolist() == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.fixture(scope="module")
def plant(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "plant.py"
    path.write_text(PLANT)
    return path


def _alive(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our own torchrun workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_exception_on_rank_1_ends_both_ranks_promptly(plant, tmp_path):
    cfg = write_config(tmp_path)
    r, seconds = torchrun([str(plant), "train", str(cfg), "model.name=planted", "model.layers=null",
                           "model.options.at=5"], timeout=120)
    end = time.time()
    out = r.stdout + r.stderr
    failed_at = float(re.search(r"planted failure at ([0-9.]+)", out).group(1))
    print(f"\nplanted exception: both ranks ended {end - failed_at:.1f} s after it ({seconds:.1f} s after launch), "
          f"torchrun exit {r.returncode}")
    assert r.returncode != 0
    assert "planted failure on rank 1 at training call 5" in out
    assert end - failed_at < 60
    assert not _alive(str(plant))  # no rank survives the group
    assert not (tmp_path / "runs/ddp/history.csv").exists()


def test_nan_on_rank_1_stops_every_rank_at_that_step(plant, tmp_path):
    cfg = write_config(tmp_path)
    r, seconds = torchrun([str(plant), "train", str(cfg), "model.name=planted", "model.layers=null",
                           "model.options.at=23", "model.options.what=nan"], timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and seconds < 60
    # both ranks report the same step (19 steps per epoch: step 23 is in epoch 2) and who saw it
    assert out.count("at step 23 (epoch 2) on rank 1") == 2, out[-3000:]
    last = ckpt.load(tmp_path / "runs/ddp/checkpoints/last.pt")
    assert last["state"]["step"] == 20 and ckpt.all_finite(last["model"])
    assert len(rows(tmp_path / "runs/ddp/history.csv")) == 1


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resume_is_exact(runs, tmp_path):
    """torchrun passes SIGTERM on to every rank: they stop after the same step, rank 0 saves, and a resumed
    torchrun run ends exactly where the uninterrupted one did."""
    import signal

    _, two, _ = runs
    cfg = write_config(tmp_path, **KNOBS)
    run_dir = tmp_path / "runs" / "ddp"
    last = run_dir / "checkpoints" / "last.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cnnlab"]
    p = subprocess.Popen([*base, "train", str(cfg)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    while p.poll() is None and not last.exists():
        time.sleep(0.005)
    time.sleep(0.05)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=90)
    seconds = time.perf_counter() - t0
    step = ckpt.load(last)["state"]["step"]
    print(f"\nSIGTERM to torchrun: ranks stopped after step {step}, group gone {seconds:.1f} s later")
    assert seconds < 30
    assert (out + err).count(f"stopped by a signal after step {step}") == 1  # rank 0 saved, once
    assert 0 < step < 2 * (1223 // 63)
    r = subprocess.run([*base, "train", "--resume", str(run_dir)], cwd=REPO, capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    drop = lambda rs: [{k: v for k, v in x.items() if k != "seconds"} for x in rs]  # noqa: E731
    assert drop(rows(run_dir / "history.csv")) == drop(rows(two / "ddp/history.csv"))
    assert (run_dir / "metrics.json").read_bytes() == (two / "ddp/metrics.json").read_bytes()
    a, b = ckpt.load(last)["model"], ckpt.load(two / "ddp/checkpoints/last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


SPY = '''
"""Test-only plugin: records which rank decodes a data set into the cache, and the native threads each rank
has left after the CLI's dist.shutdown(); then runs the cnnlab CLI."""
import os
import sys
import time

from cnnlab import dist
from cnnlab.data import pipeline

_decode_all = pipeline.decode_all
_shutdown = dist.shutdown


def log(what):
    with open(os.environ["SPY_LOG"], "a") as f:
        f.write(f"rank {os.environ.get('RANK', 0)} {what}\\n")


def spy(files, *args, **kw):
    log("enters")
    if os.environ.get("RANK") == "0":
        time.sleep(1.0)  # a slow decode: a rank not made to wait would enter meanwhile
    out = _decode_all(files, *args, **kw)
    log("leaves")
    return out


def shutdown():
    _shutdown()
    if not os.path.isdir("/proc/self/task"):  # Linux only
        return
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    with open(os.environ["THREADS_LOG"], "a") as f:
        f.write(f"rank {os.environ['RANK']}: {' '.join(names)}\\n")


pipeline.decode_all = spy
dist.shutdown = shutdown
if __name__ == "__main__":
    from cnnlab.cli import main
    sys.exit(main())
'''


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    """One torchrun of a 1-epoch run on a small folder of images, through the SPY plugin: (its result, the
    folder holding spy.log, threads.log and the cache)."""
    import numpy as np
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("spied")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "ds" / c / f"{i}.png")
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    cfg = write_config(tmp_path, **{"data.name": "folder", "data.root": str(tmp_path / "ds"), "data.val_split": 8,
                                    "data.test_split": None, "train.epochs": 1, "train.checkpoint_every_steps": None})
    old = {k: os.environ.get(k) for k in ("SPY_LOG", "THREADS_LOG", "CNNLAB_CACHE")}
    os.environ["SPY_LOG"], os.environ["THREADS_LOG"] = str(tmp_path / "spy.log"), str(tmp_path / "threads.log")
    os.environ["CNNLAB_CACHE"] = str(tmp_path / "cache")
    try:
        r, _ = torchrun([str(spy), "train", str(cfg)])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return r, tmp_path


def test_one_process_per_node_decodes_and_caches_the_data(spied):
    """Both ranks need the decoded images; the node's first process decodes and writes the cache while the
    other waits, then reads the cache (no two processes writing the same file, or downloading it)."""
    r, tmp_path = spied
    assert r.returncode == 0, r.stderr[-3000:]
    calls = (tmp_path / "spy.log").read_text().splitlines()
    # each rank asks for its train and val images; rank 1 only after rank 0 has decoded and cached both
    assert calls[:4] == ["rank 0 enters", "rank 0 leaves"] * 2 and sorted(calls[4:]) == ["rank 1 enters"] * 2 + [
        "rank 1 leaves"] * 2, calls
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2  # train and val, each written once


def test_a_study_under_torchrun_trains_each_run_on_both_processes(tmp_path, monkeypatch, capsys):
    """Rank 0 plans, locks and writes the study files; every run is trained by both ranks together."""
    path = write_config(tmp_path, **{"output.name": "ddp-study", "train.epochs": 1})
    tree = yaml.safe_load(path.read_text())
    tree["variations"] = {"main": {}, "fast": {"optim.lr": 0.1}}
    path.write_text(yaml.safe_dump(tree))
    r, _ = torchrun(["-m", "cnnlab", "train", str(path)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    root = tmp_path / "runs" / "ddp-study"
    study = json.loads((root / "study.json").read_text())
    assert study["complete"] and sorted(p.name for p in root.iterdir() if p.is_dir()) == ["fast", "main", "plots"]
    for name in ("main", "fast"):
        assert json.loads((root / name / "env.json").read_text())["world_size"] == 2
        assert len(rows(root / name / "history.csv")) == 1  # written once, by rank 0
    assert (root / "study.html").is_file() and r.stdout.count("study report:") == 1
    # --jobs under torchrun is refused before any work: seen from rank 0's environment, in this process (the
    # refusal reads only torchrun's variables; a third torchrun launch would cost ~10 s of start-up)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["train", str(path), "--jobs", "2"]) == 2
    assert "under torchrun a study trains its runs one after another" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_leaving_the_process_group_ends_its_threads(spied):
    """DistributedDataParallel imports torch.distributed.nn.functional, whose default arguments keep
    the process group it finds alive; its gloo threads then outlived destroy_process_group and ran on
    into interpreter exit, where a finished rank now and then aborted ("terminate called without an
    active exception"). The group is made after that import, so leaving it ends every gloo thread."""
    r, tmp_path = spied
    log = tmp_path / "threads.log"
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(log.read_text().splitlines())
    assert [line.split(":")[0] for line in lines] == ["rank 0", "rank 1"]
    assert not [line for line in lines if "gloo" in line], lines
