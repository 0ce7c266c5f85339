"""What a newcomer meets in the first hour (issue 18): the thread policy on a shared machine, the
learning rate shown per epoch, progress and times that tell the truth, resume that says what it does,
and tidy files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cnnlab import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 2, "batch_size": 64, "seed": 1, "progress": "off", "threads": 1, "limit_batches": 4},
    "output": {"report": False, "tensorboard": False, "name": "tiny"},
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny(folder: Path, **train) -> Path:
    cfg = folder / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], **train},
                                   "output": {**TINY["output"], "dir": str(folder)}}))
    return cfg


# ----------------------------------------------------------------------------------------------
# 1. threads on a shared machine


def test_default_threads_leave_busy_cores_alone():
    from cnnlab import threads

    assert threads.default_threads(cores=2, load=0.0) == 2  # an idle machine: every core, as PyTorch's default
    assert threads.default_threads(cores=2, load=1.2) == 1
    assert threads.default_threads(cores=2, load=9.0) == 1  # never below one
    assert threads.default_threads(cores=16, load=3.6) == 12
    assert threads.choose(3, env={}) == 3  # train.threads wins
    assert threads.choose(None, env={"OMP_NUM_THREADS": "2"}) == 2  # as a study's parallel jobs set it
    env = {}
    threads.prefer_passive_wait(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.prefer_passive_wait(env)  # the user's choice stays
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_busy_threads_are_counted_now_not_a_minute_late(tmp_path):
    """The thread count follows the load of this moment: the 1-minute load average lags, so two trainings
    started a second ago did not count (the run took two threads beside them) and a load just ended still
    did (a run on a machine gone idle took one)."""
    import os as _os

    from cnnlab import threads

    f = tmp_path / "loadavg"
    f.write_text("5.90 3.10 1.20 3/211 4242\n")  # a minute of load behind, three threads runnable now
    assert threads.runnable_now(path=str(f), samples=3, gap=0) == 3
    assert threads.runnable_now(path=str(tmp_path / "absent")) is None
    spin = "import time\nt = time.time()\nwhile time.time() - t < 30: pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        time.sleep(0.5)
        if _os.path.exists("/proc/loadavg"):
            assert threads.busy_elsewhere() >= 2  # both, within half a second of their start
            assert threads.default_threads(cores=2) == 1
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The quickstart through `python -m cnnlab` with a one-cycle schedule peaking in epoch 1, a tqdm bar."""
    out = tmp_path_factory.mktemp("runs")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-m", "cnnlab", "train", "examples/quickstart.yaml", "train.epochs=2",
                        "train.limit_batches=8", "train.log_every=5", "schedule.name=onecycle", "schedule.pct_start=0.25",
                        "train.progress=bar", "output.report=false", "output.tensorboard=false",
                        f"output.dir={out}"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    return out / "quickstart", r


def test_the_cli_makes_openmp_threads_sleep_while_they_wait(cli_run):
    run_dir, _ = cli_run
    env = json.loads((run_dir / "env.json").read_text())
    assert env["omp_wait_policy"] == "PASSIVE"
    assert env["torch_threads"] >= 1


# ----------------------------------------------------------------------------------------------
# 9. the learning rate of an epoch


def test_epoch_learning_rate_is_its_peak_and_the_line_shows_the_range(cli_run):
    run_dir, r = cli_run
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # one-cycle over 16 steps, 25% warm-up: the rate peaks at optim.lr (0.003) in epoch 1, from 0.003/25
    assert float(rows[0]["lr"]) == pytest.approx(0.003)
    assert float(rows[1]["lr"]) < 0.003
    line = next(x for x in r.stdout.splitlines() if x.startswith("epoch   1/2"))
    assert " lr 0.00012-0.003 " in line, line


def test_progress_line_shows_one_rate_when_it_did_not_change(capsys):
    from cnnlab.training import runlog as R

    row = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.6, "val_acc": 0.8, "lr": 0.1, "seconds": 7.0}
    R.Progress("lines", 10, 2).epoch(row, lr_low=0.1)
    R.Progress("lines", 10, 2).epoch(row, lr_low=0.02)
    out = capsys.readouterr().out.splitlines()
    assert " lr 0.1 " in out[0] and " lr 0.02-0.1 " in out[1]


# ----------------------------------------------------------------------------------------------
# 11. cosmetic


def test_first_progress_frame_shows_no_nan_loss(cli_run):
    _, r = cli_run
    assert "step/s" in r.stderr or "it/s" in r.stderr or "/16" in r.stderr  # the bar was drawn
    assert "nan" not in r.stderr


def test_csv_files_end_lines_with_newline_only(cli_run):
    run_dir, _ = cli_run
    for name in ("history.csv", "steps.csv", "predictions.csv"):
        data = (run_dir / name).read_bytes()
        assert data and b"\r" not in data, name


# ----------------------------------------------------------------------------------------------
# 3. silence and misleading times


def test_first_decode_of_a_large_folder_shows_progress(tmp_path, monkeypatch, capsys):
    from cnnlab.data import pipeline

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    files = []
    for i in range(30):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(files[-1])
    monkeypatch.setattr(pipeline, "PROGRESS_FROM", 20)
    first = pipeline.decode_all(files, 3, None)
    err = capsys.readouterr().err
    assert "decoding 30 images" in err and "decoded 30/30 images" in err
    again = pipeline.decode_all(files, 3, None)  # from the cache: quiet
    assert capsys.readouterr().err == "" and torch.equal(first, again)
    pipeline.decode_all(files[:10], 3, None)  # small: quiet the first time too
    assert capsys.readouterr().err == ""


def test_env_json_says_when_the_run_started_before_training(tmp_path, monkeypatch):
    from cnnlab.training import loop

    seen = {}
    fit = loop.fit

    def watching_fit(cfg, run_dir, splits, **kw):
        seen["env"] = json.loads((run_dir / "env.json").read_text())
        return fit(cfg, run_dir, splits, **kw)

    monkeypatch.setattr(loop, "fit", watching_fit)
    assert cli.main(["train", str(tiny(tmp_path))]) == 0
    env = json.loads((tmp_path / "tiny" / "env.json").read_text())
    assert seen["env"]["started"] == env["started"] and env["finished"] >= env["started"]


def test_resume_says_where_and_train_seconds_cover_the_whole_run(tmp_path, capsys):
    assert cli.main(["train", str(tiny(tmp_path, epochs=3))]) == 0
    run_dir = tmp_path / "tiny"
    first = json.loads((run_dir / "env.json").read_text())
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir), "train.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} after epoch 3 (step 12) of 4" in out
    env = json.loads((run_dir / "env.json").read_text())
    with open(run_dir / "history.csv", newline="") as f:
        epochs = [float(r["seconds"]) for r in csv.DictReader(f)]
    assert len(epochs) == 4
    assert env["started"] == first["started"] and len(env["resumed"]) == 1
    # the whole run: every epoch's seconds, and more than the first session alone
    assert env["train_seconds"] >= sum(epochs) and env["train_seconds"] > first["train_seconds"]


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    assert cli.main(["train", str(tiny(tmp_path))]) == 0
    run_dir = tmp_path / "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "nothing to resume" in out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_a_refused_resume_leaves_the_runs_config_as_it_was(tmp_path, capsys):
    """`--resume RUN train.epochs=N` on a run whose last.pt is damaged used to rewrite config.yaml with N
    before the checkpoint was refused: the run then said it was set for epochs it never had."""
    assert cli.main(["train", str(tiny(tmp_path))]) == 0
    run_dir = tmp_path / "tiny"
    config, env = (run_dir / "config.yaml").read_bytes(), (run_dir / "env.json").read_bytes()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir), "train.epochs=3"]) != 0
    assert "last.pt" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == config
    assert (run_dir / "env.json").read_bytes() == env  # no resume is listed: none happened


# ----------------------------------------------------------------------------------------------
# 2. the failure gallery


def test_samples_hold_the_worst_failures_of_every_confused_pair_the_report_names(tmp_path):
    """Many high-loss failures of one pair used to crowd out every other pair's worst images."""
    from types import SimpleNamespace

    from cnnlab.analysis.diagnose import confused_pairs
    from cnnlab.analysis.metrics import summary
    from cnnlab.data.base import ImageSet
    from cnnlab.training.experiment import save_predictions

    rng = np.random.default_rng(3)
    n, k = 400, 4
    targets = torch.from_numpy(rng.integers(0, k, n))
    logits = torch.zeros(n, k)
    logits[torch.arange(n), targets] = 4.0  # right, confidently
    wrong_to = {0: 1, 2: 3, 3: 0}  # three confused pairs; the first with many very confident mistakes
    strength = {0: 9.0, 2: 5.0, 3: 5.5}
    for i in range(n):
        t = int(targets[i])
        if t in wrong_to and rng.random() < (0.8 if t == 0 else 0.15):
            logits[i, wrong_to[t]] = strength[t] + rng.random()
    images = torch.from_numpy(rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8))
    s = ImageSet(labels=targets.numpy(), classes=list("abcd"), ids=[f"s{i}" for i in range(n)], images=images)
    splits = SimpleNamespace(eval_set=s, classes=list("abcd"), channels=1, size=4)
    save_predictions(tmp_path, splits, logits, targets, seed=0)
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    saved = set(np.load(tmp_path / "samples.npz")["index"].tolist())
    named = confused_pairs(summary(logits.numpy(), targets.numpy(), splits.classes), top=5)
    assert len(named) == 3
    for p in named:
        fails = sorted((r for r in rows if r["target_name"] == p["true"] and r["pred_name"] == p["pred"]),
                       key=lambda r: -float(r["loss"]))
        top = {int(r["index"]) for r in fails[:8]}
        assert top <= saved, (p, sorted(top - saved))


# ----------------------------------------------------------------------------------------------
# 11. cosmetic (continued)


def test_an_unreadable_image_is_named_in_the_error(tmp_path):
    from cnnlab.data import base

    bad = tmp_path / "cat" / "7.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Exception) as e:
        base.open_image(str(bad))
    assert str(bad) in str(e.value) and "BytesIO" not in str(e.value)


def test_data_stats_lists_every_class_of_ten():
    from cnnlab.data.stats import Stats

    names = [f"class{i}" for i in range(10)]
    s = Stats(mean=(0.5,), std=(0.2,), channels=1, n_images=55, n_pixels=55 * 64,
              class_counts={c: i + 1 for i, c in enumerate(names)}, sizes={"8x8": 55}, modes={"L": 55})
    line = next(x for x in s.format().splitlines() if x.startswith("classes"))
    assert all(c in line for c in names) and "in all" not in line


# ----------------------------------------------------------------------------------------------
# 10. config errors


def test_every_problem_of_a_config_is_shown_at_once(tmp_path):
    from cnnlab import config as C

    p = tmp_path / "exp.yaml"
    p.write_text("model:\n  batchnrom: true\ntrain:\n  batch_sise: 32\n  epochs: three\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert "3 problems" in msg and str(p) in msg
    for word in ("model.batchnrom", "model.batchnorm", "train.batch_sise", "train.batch_size", "train.epochs"):
        assert word in msg, (word, msg)


def test_a_command_line_typo_is_blamed_on_the_command_line(tmp_path):
    from cnnlab import config as C

    with pytest.raises(C.ConfigError) as e:
        C.load(ROOT / "examples" / "quickstart.yaml", ["optim.lrr=0.1"])
    assert str(e.value).startswith("command line: unknown key 'optim.lrr'") and "quickstart.yaml" not in str(e.value)
    p = tmp_path / "exp.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(C.ConfigError) as e:  # the same typo in the file is the file's
        C.load(p, ["train.epochs=2"])
    assert str(e.value).startswith(f"{p}: unknown key 'optim.lrr'")


def test_a_key_without_its_section_suggests_the_dotted_key():
    from cnnlab import config as C

    with pytest.raises(C.ConfigError, match=r"Did you mean 'optim\.lr'\?"):
        C.load(None, ["lr=0.1"])
    with pytest.raises(C.ConfigError, match=r"Did you mean 'train\.epochs'\?"):
        C.load(None, ["epochs=3"])


def test_every_command_line_option_has_a_help_text():
    import argparse

    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and not a.help:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")

    walk(cli.build_parser(), "cnnlab")
    assert not missing, missing


def test_explain_takes_padding_same_and_summary_suggests_torchvision(capsys):
    assert cli.main(["explain", "conv", "--input", "[[1,2,3],[4,5,6],[7,8,9]]", "--kernel", "box",
                     "--padding", "same"]) == 0
    same = capsys.readouterr().out
    assert cli.main(["explain", "conv", "--input", "[[1,2,3],[4,5,6],[7,8,9]]", "--kernel", "box",
                     "--padding", "1"]) == 0
    assert same == capsys.readouterr().out
    assert cli.main(["summary", "resnet50"]) == 2
    assert "Did you mean 'torchvision:resnet50'" in capsys.readouterr().err
