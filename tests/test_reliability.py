"""Reliability: exact resume after SIGTERM/SIGINT/SIGKILL, atomic saves, disk pre-flight, non-finite loss.

The kill test forks its training processes from a "zygote" that has imported torch and cnnlab once
(an import costs seconds on 2 cores; 20 kills would otherwise spend most of their time importing).
The children are real processes doing real file I/O, killed with a real SIGKILL. The SIGTERM/SIGINT
test runs `python -m cnnlab` itself, to see the exit codes the process really returns.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cnnlab.training import checkpoint as ckpt
from cnnlab import cli
from cnnlab.training import loop as T
from cnnlab.models import MODELS
from planted import NanAt

REPO = Path(__file__).resolve().parents[1]

# A tiny CNN on digits: 5 epochs of 38 steps, a checkpoint every 3 steps, one thread (reproducible).
TINY = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2, "augment": {"crop_padding": 1, "hflip": True}},
    "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": 32}, "relu", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.003},
    "schedule": {"name": "cosine"},
    "train": {"epochs": 5, "batch_size": 32, "seed": 0, "progress": "off", "threads": 1,
              "checkpoint_every_steps": 3},
    "output": {"report": False},
}


def write_config(folder: Path, name: str = "tiny", **train) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(train)
    cfg["output"]["dir"] = str(folder / "runs")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(run_dir: Path, drop=("seconds",)) -> list[dict]:
    """history.csv without its wall-clock column (the only one that may differ between equal runs)."""
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def weights(run_dir: Path, which: str = "last") -> dict:
    return ckpt.load(run_dir / "checkpoints" / f"{which}.pt")["model"]


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def tmp_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# A zygote: imports once, forks one child per run; the test kills the children.

ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)  # no OpenMP pool before fork
import torch._dynamo, cnnlab.cli, cnnlab.training.experiment, cnnlab.training.loop  # the slow imports, once,
import sklearn.datasets, sklearn.model_selection, torch.utils.tensorboard, torchinfo  # and those a run makes late
cnnlab.cli.build_parser()
assert len(os.listdir("/proc/self/task")) == 1, "fork needs a single-threaded parent"
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = cnnlab.cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    def __init__(self, cwd: Path):
        # one thread everywhere, so the zygote is single-threaded when it forks (no lock held by another thread)
        # (and no jemalloc background thread in pyarrow, which scikit-learn imports)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "JE_ARROW_MALLOC_CONF": "background_thread:false"}
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=cwd, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.status: int | None = None
        threading.Thread(target=self._read, daemon=True).start()
        assert self._line(120) == "ready"

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.strip())

    def _line(self, timeout: float) -> str:
        return self.lines.get(timeout=timeout)

    def start(self, argv: list[str], log: Path) -> int:
        self.p.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.p.stdin.flush()
        return int(self._line(60))

    def wait(self, timeout: float = 120) -> int:
        if self.status is not None:
            code, self.status = self.status, None
            return code
        return int(self._line(timeout))

    def finished(self) -> bool:
        """Whether the current child has ended (without blocking)."""
        if self.status is None:
            try:
                self.status = int(self.lines.get_nowait())
            except queue.Empty:
                return False
        return True

    def run(self, argv: list[str], log: Path) -> int:
        self.start(argv, log)
        return self.wait()

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the kill test forks its runs (Linux)")
    z = Zygote(REPO)
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = write_config(folder)
    t0 = time.perf_counter()
    rc = zygote.run(["train", str(cfg)], folder / "log.txt")
    seconds = time.perf_counter() - t0
    assert rc == 0, (folder / "log.txt").read_text()
    return folder / "runs" / "tiny", seconds


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    assert history(run_dir) == history(ref_dir)
    assert (run_dir / "metrics.json").read_bytes() == (ref_dir / "metrics.json").read_bytes()
    assert_weights_close(weights(run_dir), weights(ref_dir), atol=1e-6)
    assert_weights_close(weights(run_dir, "best"), weights(ref_dir, "best"), atol=1e-6)
    steps = [int(r["step"]) for r in csv.DictReader(open(run_dir / "steps.csv", newline=""))]
    ref_steps = [int(r["step"]) for r in csv.DictReader(open(ref_dir / "steps.csv", newline=""))]
    assert steps == ref_steps  # no row lost, none written twice


# ----------------------------------------------------------------------------------------------


def test_sigkill_at_20_moments_then_resume_matches_uninterrupted(zygote, reference, tmp_path):
    ref_dir, ref_seconds = reference
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    ckdir = run_dir / "checkpoints"
    log = tmp_path / "log.txt"
    rng = random.Random(20240601)
    record = []

    def until(cond, timeout: float = 60.0) -> None:  # poll while the child runs
        end = time.perf_counter() + timeout
        while not cond() and not zygote.finished() and time.perf_counter() < end:
            pass

    seen = {}

    def last_step() -> int:  # the step of checkpoints/last.pt, read again only when it changes
        try:
            mtime = (ckdir / "last.pt").stat().st_mtime_ns
            if mtime not in seen:
                seen[mtime] = ckpt.load(ckdir / "last.pt")["state"]["step"]
            return seen[mtime]
        except FileNotFoundError:  # not written yet
            return 0

    steps_total = 5 * 38
    targets = iter(sorted(rng.sample(range(3, steps_total), 10)))

    seen_tmp: set[str] = set()
    for i in range(20):
        resume = (run_dir / "config.yaml").is_file()
        argv = ["train", "--resume", str(run_dir)] if resume else ["train", str(cfg)]
        t0 = time.perf_counter()
        pid = zygote.start(argv, log)
        if not resume:  # the first run must get as far as its run folder, or there is nothing to resume
            until(lambda: (run_dir / "config.yaml").is_file())
        mode = ("save", "random", "random", "startup")[i % 4]
        if mode == "save":  # as soon as a checkpoint's temporary file appears: in the middle of a save
            until(lambda: ckdir.is_dir() and any(ckpt.is_stale_tmp(e.name) for e in os.scandir(ckdir)))
        elif mode == "random":  # a random moment soon after a random step, spread over the whole run
            target = next(targets)
            until(lambda: last_step() >= target)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # while starting up: reading the data, building the model, loading the checkpoint
            time.sleep(rng.uniform(0.0, 0.5))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = zygote.wait()
        left = {p.name for p in ckdir.glob(".*.tmp")} if ckdir.is_dir() else set()
        new_tmp, seen_tmp = left - seen_tmp, seen_tmp | left  # a temporary file this kill left: killed mid-save
        for pt in sorted(ckdir.glob("*.pt")) if ckdir.is_dir() else []:
            ckpt.load(pt)  # every checkpoint on disk loads with weights_only=True, whenever the kill came
        step = ckpt.load(ckdir / "last.pt")["state"]["step"] if (ckdir / "last.pt").is_file() else 0
        record.append({"mode": mode, "rc": rc, "after_s": round(time.perf_counter() - t0, 2), "step": step,
                       "tmp_left": len(new_tmp)})
    rc = zygote.run(["train", "--resume", str(run_dir)], log)
    assert rc == 0, log.read_text()[-3000:]
    print("\nkills:", json.dumps(record))
    killed = [r for r in record if r["rc"] == -signal.SIGKILL]
    print(f"{len(killed)} of 20 processes killed by SIGKILL, {sum(r['tmp_left'] > 0 for r in record)} of them "
          f"during a save (a temporary file left behind); steps at the kills: {[r['step'] for r in record]}")
    assert len(killed) >= 15  # the kills landed while the run was still going
    assert sum(r["tmp_left"] > 0 for r in record) >= 3  # and several in the middle of a save
    assert tmp_files(run_dir) == []  # the resumes removed every stale temporary file
    assert_same_run(run_dir, ref_dir)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # always the same run folder


def test_sigterm_then_sigint_through_the_cli_then_resume_is_exact(zygote, reference, tmp_path):
    """`python -m cnnlab train`: SIGTERM -> checkpoint + exit 143; resume; SIGINT -> exit 130; resume -> the
    same history.csv, metrics.json and weights as the uninterrupted run."""
    ref_dir, _ = reference
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    last = run_dir / "checkpoints" / "last.pt"
    codes, steps = [], []
    for argv, sig in ((["train", str(cfg)], signal.SIGTERM), (["train", "--resume", str(run_dir)], signal.SIGINT)):
        before = last.stat().st_mtime_ns if last.exists() else None
        p = subprocess.Popen([sys.executable, "-m", "cnnlab", *argv], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        while p.poll() is None:  # signal once training is under way (a new last.pt was written)
            if last.exists() and last.stat().st_mtime_ns != before:
                time.sleep(0.1)
                p.send_signal(sig)
                break
            time.sleep(0.005)
        out, err = p.communicate(timeout=120)
        codes.append(p.returncode)
        steps.append(ckpt.load(last)["state"]["step"])
        assert "stopped by a signal" in err and "--resume" in err, err
    assert codes == [143, 130]
    assert 0 < steps[0] < steps[1] < 5 * 38
    assert zygote.run(["train", "--resume", str(run_dir)], tmp_path / "log.txt") == 0  # (saves an import)
    assert_same_run(run_dir, ref_dir)


# ----------------------------------------------------------------------------------------------
# Atomic saves


def _ckpt_obj(scale: float = 1.0) -> dict:
    return {"model": {"w": torch.full((256, 1024), scale)}, "state": {"step": 1}}  # 1 MiB of tensor


class Payload:
    def __reduce__(self):
        raise RuntimeError("cannot pickle me")


def test_unpicklable_object_is_refused_and_previous_checkpoint_kept(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.atomic_save(_ckpt_obj(), path)
    digest = sha256(path)

    with pytest.raises(ckpt.CheckpointError, match="Payload"):  # refused before a byte is written
        ckpt.atomic_save({**_ckpt_obj(2.0), "extra": Payload()}, path)
    assert sha256(path) == digest and os.listdir(tmp_path) == ["last.pt"]


def test_save_failing_while_pickling_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save(_ckpt_obj(), path)
    digest = sha256(path)

    monkeypatch.setattr(ckpt, "check_plain", lambda obj, where="": None)  # let it reach the pickler
    with pytest.raises(ckpt.CheckpointError, match="cannot pickle me"):
        ckpt.atomic_save({**_ckpt_obj(2.0), "extra": Payload()}, path)
    assert sha256(path) == digest and os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(ckpt.load(path)["model"]["w"], _ckpt_obj()["model"]["w"])


def test_full_disk_half_way_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save(_ckpt_obj(), path)
    digest = sha256(path)
    real_fdopen = os.fdopen
    written = []

    class FullDisk:
        """A file whose disk fills up after 64 KiB."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            if sum(written) + len(b) > 65536:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(b))
            return self.f.write(b)

        def __getattr__(self, name):  # flush, fileno, close, ...
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real_fdopen(fd, mode, *a, **k)))
    with pytest.raises(ckpt.CheckpointError, match="No space left on device") as e:
        ckpt.atomic_save(_ckpt_obj(3.0), path)
    assert e.value.__cause__.errno == errno.ENOSPC
    assert sum(written) > 0  # it did fail half-way, after writing part of the file
    monkeypatch.undo()
    assert sha256(path) == digest and os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(ckpt.load(path)["model"]["w"], _ckpt_obj()["model"]["w"])


def test_stale_temp_files_are_recognised_and_removed(tmp_path):
    for name in (".last.pt.3f9c0a1b.tmp", ".best.pt.00aa11bb.tmp", "last.pt", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert ckpt.clean_stale_tmp(tmp_path) == [".best.pt.00aa11bb.tmp", ".last.pt.3f9c0a1b.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "notes.tmp"]


def test_checkpoint_files_are_readable_by_the_group(tmp_path):
    ckpt.atomic_save(_ckpt_obj(), tmp_path / "last.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------
# Pre-flight disk check, non-finite loss and weights


def test_too_little_disk_space_refuses_to_start(tmp_path, monkeypatch, capsys):
    import shutil

    cfg = write_config(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=123_456))
    rc = cli.main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 1
    ckdir = tmp_path / "runs" / "tiny" / "checkpoints"
    assert str(ckdir) in err and "123456 bytes" in err and "needs about" in err, err
    assert not (tmp_path / "runs" / "tiny" / "history.csv").exists()  # nothing trained


if "planted_nan" not in MODELS:
    @MODELS.register("planted_nan")
    def _planted_nan(*, num_classes: int, in_channels: int, input_size: int, at: int = 1) -> nn.Module:
        # a tiny CNN whose forward returns NaN at its `at`-th training call
        return NanAt(nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(8 * input_size * input_size, num_classes)), at)


def test_nan_at_step_k_stops_there_and_keeps_what_was_written(tmp_path, capsys):
    cfg = write_config(tmp_path, checkpoint_every_steps=4)
    k = 45  # in epoch 2 (38 steps per epoch)
    rc = cli.main(["train", str(cfg), "model.name=planted_nan", "model.layers=null", f"model.options.at={k}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"at step {k} (epoch 2)" in err and "Likely causes" in err and "learning rate" in err, err
    run_dir = tmp_path / "runs" / "tiny"
    assert len(history(run_dir)) == 1  # epoch 1's row is kept
    last = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert last["state"]["step"] == 44 and ckpt.all_finite(last["model"])  # the checkpoint before step k
    assert max(int(r["step"]) for r in csv.DictReader(open(run_dir / "steps.csv"))) < k


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = T.Config()
    path = tmp_path / "last.pt"
    T.TrainState(model, opt, sched, cfg=cfg, progress=T.State(step=1)).save(path)
    digest = sha256(path)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(T.NonFiniteLossError, match="non-finite weights at step 2"):
        T.TrainState(model, opt, sched, cfg=cfg, progress=T.State(step=2)).save(path)
    assert sha256(path) == digest and os.listdir(tmp_path) == ["last.pt"]


def test_a_non_finite_metric_is_never_best():
    for monitor in ("val_acc", "val_loss"):
        assert not T._is_better(float("nan"), None, monitor, 0.0)
        assert not T._is_better(float("nan"), 0.5, monitor, 0.0)
        assert not T._is_better(float("-inf"), 0.5, monitor, 0.0)
    assert not T._is_better(float("inf"), 0.5, "val_acc", 0.0)
    assert T._is_better(0.6, 0.5, "val_acc", 0.0) and T._is_better(0.4, 0.5, "val_loss", 0.0)
