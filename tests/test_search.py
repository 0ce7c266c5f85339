"""Hyperparameter search (`search:` in a study config, studies/search.py) on digits with a one-conv net:
trials as run folders, the trials table, best.yaml and the report; pruned trials stop at the epoch the median
pruner says (its rule checked independently); a SIGKILLed search resumes to the same trials table as an
uninterrupted one; `--jobs 2` processes share one storage; Ray; bad search settings refused by name."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnlab import cli
from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.studies import compare, study

optuna = pytest.importorskip("optuna", reason="search needs Optuna (pip install 'cnnlab[search]')")

TINY = {
    "data": {"name": "digits", "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 4, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 3, "progress": "off", "batch_size": 64, "threads": 1},
    "output": {"report": False},
    "search": {"space": {"optim.lr": {"loguniform": [1e-3, 0.3]}, "optim.name": ["adam", "sgd"]},
               "trials": 4, "pruner": "median", "startup_trials": 1, "warmup_epochs": 1, "seed": 2},
}


def tree(out: Path, name: str, **search) -> dict:
    t = json.loads(json.dumps(TINY))
    t["output"].update(dir=str(out), name=name)
    t["search"].update(search)
    return t


def write_yaml(out: Path, name: str, **search) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree(out, name, **search)))
    return path


def trials_table(root: Path) -> list[dict]:
    """search.csv without the wall times: what must not depend on interruptions."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in R.read_csv(root / "search.csv")]


def stored(root: Path) -> list:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(root / "search.journal")))
    return optuna.load_study(study_name=root.name, storage=storage).get_trials()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted inline search."""
    out = tmp_path_factory.mktemp("search")
    study.run_study(C.load(tree(out, "ref")), quiet=True)
    return out / "ref"


def test_trials_are_run_folders_with_a_table_a_report_and_best_yaml(reference):
    root = reference
    rows = R.read_csv(root / "search.csv")
    assert len(rows) == 4 and {r["trial"] for r in rows} == {f"trial-00{i}" for i in range(4)}
    for r in rows:  # the objective: val_acc at the run's best epoch, from its own files
        run = R.load_run(root / r["trial"], finished=True)
        best = next(h for h in run.history if h["epoch"] == run.metrics["best_epoch"])
        assert r["val_acc"] == pytest.approx(best["val_acc"])
        assert run.config.optim.name == r["optim.name"] and run.config.search == {}
    scored = [r["val_acc"] for r in rows]
    assert scored == sorted(scored, reverse=True)  # best first
    summary = json.loads((root / "search.json").read_text())
    best = summary["best"]
    assert best["value"] == max(r["val_acc"] for r in rows if r["state"] == "complete")
    cfg = C.load(root / "best.yaml")  # a ready single-run config with the best settings
    assert not cfg.search and cfg.optim.lr == best["params"]["optim.lr"]
    assert cfg.optim.name == best["params"]["optim.name"] and cfg.output.name == "ref-best"
    assert set(summary["importances"]) <= {"optim.lr", "optim.name"}
    md = (root / "search.md").read_text()
    assert "| rank | trial | state | val_acc |" in md and f"{best['name']} (best)" in md
    assert "pruned at epoch" in md
    for fig in ("history", "slices", "epochs"):
        assert (root / "plots" / f"search_{fig}.png").is_file()
    assert (root / "search.html").read_text().count("<tr") == 5
    groups, base, _ = compare.load_groups([root])  # study.json: `cnnlab compare` reads the trials
    assert len(groups) == 4 and base == best["name"]


def test_pruned_trials_stop_at_the_epoch_the_median_pruner_said(reference):
    trials = sorted(stored(reference), key=lambda t: t.number)
    states = [t.state.name for t in trials]
    assert "PRUNED" in states and "COMPLETE" in states, states
    for t in trials:
        run = R.load_run(reference / f"trial-{t.number:03d}", finished=True)
        # every epoch reported by the loop's hook, no more (history.csv keeps 6 digits)
        vals = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        assert vals == pytest.approx([h["val_acc"] for h in run.history], rel=1e-5)
        # the median rule (Optuna's MedianPruner, maximising) recomputed: after the warm-up epoch, with >= 1
        # completed earlier trial, a trial whose best value so far is below their median at epoch e is pruned
        earlier = [u for u in trials if u.number < t.number and u.state.name == "COMPLETE"]
        verdicts = [e > 1 and bool(earlier) and max(vals[:e]) < np.median([u.intermediate_values[e] for u in earlier])
                    for e in range(1, len(vals) + 1)]
        if t.state.name == "PRUNED":
            assert t.last_step == len(vals) == run.metrics["epochs_run"] == 2
            assert verdicts[-1] and not any(verdicts[:-1]), (t.number, vals, verdicts)
            assert "median pruner after epoch" in run.metrics["stopped_by"]
        else:
            assert len(vals) == 3 and not any(verdicts[:2]) and "stopped_by" not in run.metrics


def test_a_killed_search_resumes_to_the_same_trials_table(reference, tmp_path, capsys):
    target = next(r["trial"] for r in R.read_csv(reference / "search.csv")  # a trial that runs all 3 epochs
                  if r["state"] == "complete" and r["trial"] != "trial-000")
    path = write_yaml(tmp_path, "killed")
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last, deadline = root / target / "checkpoints" / "last.pt", time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = study.run_state(root / target) == "partial"
    study.run_study(C.load(path))
    out = capsys.readouterr().out
    if interrupted:  # (almost always: a trial's 3 epochs take far longer than the poll)
        assert f"{target} (resuming)" in out
    assert trials_table(root) == trials_table(reference)
    assert sorted(t.number for t in stored(root)) == list(range(4))


def test_jobs_2_share_one_storage_without_lost_or_duplicated_trials(tmp_path):
    path = write_yaml(tmp_path, "par", trials=2)
    assert cli.main(["train", str(path), "--jobs", "2"]) == 0  # two trials at once, one storage
    root = tmp_path / "par"
    trials = stored(root)
    assert sorted(t.number for t in trials) == [0, 1]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 2
    for t in trials:  # each child process reported its epochs to the shared storage
        hist = R.read_csv(root / f"trial-{t.number:03d}" / "history.csv")
        assert [t.intermediate_values[e] for e in sorted(t.intermediate_values)] == \
            pytest.approx([h["val_acc"] for h in hist], rel=1e-5)
    assert sorted(p.name for p in root.glob("trial-*")) == ["trial-000", "trial-001"]
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["trial-000.log", "trial-001.log"]
    assert [r["trial"] for r in R.read_csv(root / "search.csv")] != []


@pytest.mark.xdist_group("ray")
def test_ray_executor_reports_to_the_storage(tmp_path, ray_local):  # conftest: the shared local instance
    cfg = C.load(tree(tmp_path, "ray", trials=2, pruner="none"), ["train.epochs=2"])
    study.run_study(cfg, executor="ray", jobs=2, quiet=True)
    root = tmp_path / "ray"
    trials = stored(root)
    assert sorted(t.number for t in trials) == [0, 1] and {t.state.name for t in trials} == {"COMPLETE"}
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2]  # reported from the Ray worker
        assert C.load(root / f"trial-{t.number:03d}" / "config.yaml").output.dir == str(root)
    assert len(R.read_csv(root / "search.csv")) == 2


@pytest.mark.parametrize("change, message", [
    ({"search.space": {"optim.lr": {"loguniform": [0, 1]}}}, r"search\.space\.optim\.lr=.*low > 0"),
    ({"search.space": {"optim.lrr": [0.1, 0.2]}}, r"search\.space\.optim\.lrr: the value 0\.1 cannot be run.*optim\.lr"),
    ({"search.objective": "test.accuracy"}, r"search\.pruner='median'"),
    ({"search.sampler": "grid"}, r"search\.sampler='grid'.*list of values"),
    ({"variations": {"a": {}}}, r"search: a search chooses its own runs"),
    ({"search.trails": 3}, r"Did you mean 'search\.trials'"),
])
def test_bad_search_settings_are_refused_by_name(tmp_path, capsys, change, message):
    path = tmp_path / "bad.yaml"
    t = tree(tmp_path, "bad")
    for k, v in change.items():
        C.set_dotted(t, k, v)
    path.write_text(yaml.safe_dump(t))
    assert cli.main(["train", str(path)]) == 2
    import re

    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "bad").exists()


def test_with_repeats_the_best_settings_and_the_baseline_are_rerun_over_seeds(tmp_path):
    t = tree(tmp_path, "rep", trials=2, pruner="none")
    t["repeats"], t["train"]["epochs"] = 2, 1
    study.run_study(C.load(t), quiet=True)
    root = tmp_path / "rep"
    best = json.loads((root / "search.json").read_text())["best"]
    man = json.loads((root / "repeats" / "study.json").read_text())
    assert [v["name"] for v in man["variations"]] == ["baseline", "best"] and man["seeds"] == [0, 1]
    best_runs = [R.load_run(root / "repeats" / "best" / f"seed-{s}", finished=True) for s in (0, 1)]
    assert all(r.config.optim.lr == best["params"]["optim.lr"] for r in best_runs)
    assert R.load_run(root / "repeats" / "baseline" / "seed-1", finished=True).config.optim.lr == 0.01
    comp = json.loads((root / "repeats" / "comparison.json").read_text())["comparisons"][0]
    assert comp["name"] == "best" and comp["test"] == "paired_t"
    assert comp["text"]["head"] in (root / "search.md").read_text()
    assert sorted(p.name for p in root.glob("trial-*")) == ["trial-000", "trial-001"]
