"""End to end: the CLI trains into a complete run folder; best/last checkpoints; early stopping; eval."""
import csv
import json
import subprocess
import sys

import pytest
import torch

import cnnlab
from inproc import run_cli

FAST = ["train.epochs=3", "train.progress=off", "output.report=false"]


def _history(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "cnnlab", "train", "examples/quickstart.yaml", *FAST,
                        f"output.dir={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "quickstart", r.stdout, r.stderr


def test_cli_run_folder_holds_every_file(cli_run):
    run_dir, stdout, _ = cli_run
    for name in ["config.yaml", "env.json", "data.json", "model.json", "history.csv", "steps.csv", "metrics.json",
                 "predictions.csv", "predictions.npz", "samples.npz", "splits.npz",
                 "checkpoints/best.pt", "checkpoints/last.pt"]:
        assert (run_dir / name).is_file(), name
    assert "test accuracy" in stdout
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval_split"] == "test" and 0 <= m["test"]["accuracy"] <= 1
    assert len(_history(run_dir)) == 3


def test_a_run_without_augmentation_policies_never_imports_torchvision(cli_run):
    """torchvision's import loads torch._dynamo (~2 s of CPU); eval, predict and report never need it, and a
    run needs it only for the v2 policies or MixUp/CutMix (data/augment.py imports it then)."""
    _, _, stderr = cli_run
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")}
    assert "cnnlab.training.experiment" in imported and "torchvision" not in imported


def test_tensorboard_scalars_are_written_while_training(cli_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = cli_run
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"step/loss", "step/lr", "epoch/train_loss", "epoch/val_acc", "epoch/val_loss"} <= set(tags)
    hist = _history(run_dir)
    assert [e.step for e in ea.Scalars("epoch/val_acc")] == [1, 2, 3]
    assert [round(e.value, 5) for e in ea.Scalars("epoch/val_acc")] == [round(float(r["val_acc"]), 5) for r in hist]


def test_best_and_last_checkpoints(cli_run):
    run_dir, _, _ = cli_run
    hist = _history(run_dir)
    accs = [float(r["val_acc"]) for r in hist]
    best_epoch = 1 + accs.index(max(accs))  # first epoch reaching the maximum
    best = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert best["state"]["epoch"] == best_epoch
    assert last["state"]["epoch"] == 3
    assert json.loads((run_dir / "metrics.json").read_text())["best_epoch"] == best_epoch


def test_runs_are_never_overwritten(tmp_path):
    a = cnnlab.train("examples/quickstart.yaml", ["train.epochs=1", "train.progress=off", "output.report=false",
                                                  f"output.dir={tmp_path}"], quiet=True)
    b = cnnlab.train("examples/quickstart.yaml", ["train.epochs=1", "train.progress=off", "output.report=false",
                                                  f"output.dir={tmp_path}"], quiet=True)
    assert a.dir != b.dir and a.dir.name == "quickstart" and b.dir.name == "quickstart-2"


def test_early_stopping_stops_after_patience(tmp_path):
    # min_delta larger than any possible change: no epoch after the first counts as an improvement
    run = cnnlab.train("examples/quickstart.yaml", ["train.epochs=10", "train.monitor=val_loss",
                       "train.early_stop.patience=2", "train.early_stop.min_delta=100", "train.progress=off",
                       "output.report=false", f"output.dir={tmp_path}"], quiet=True)
    assert len(_history(run.dir)) == 3
    assert run.metrics["stopped_early"] and run.metrics["best_epoch"] == 1


def test_eval_command_re_evaluates_without_overwriting(cli_run):
    run_dir, _, _ = cli_run
    r = run_cli("eval", run_dir)  # in this process (tests/inproc.py); the training above is a real process
    assert r.returncode == 0, r.stderr
    m = json.loads((run_dir / "evals/1/metrics.json").read_text())
    orig = json.loads((run_dir / "metrics.json").read_text())
    assert m["test"]["accuracy"] == pytest.approx(orig["test"]["accuracy"])


def test_unknown_dataset_root_is_a_clear_error(tmp_path):
    r = run_cli("train", "examples/quickstart.yaml", "data.name=folder", f"data.root={tmp_path}/nope",
                f"output.dir={tmp_path}/runs")
    assert r.returncode == 2 and "nope" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folder left
