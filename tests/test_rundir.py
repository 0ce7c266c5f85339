"""The run folder's owner (cnnlab.rundir): a trained folder is marked as cnnlab's and read back typed by
RunDir (config, data facts, history, metrics, predictions, the model from its checkpoint); the writers are
atomic; and no other module spells a run-folder file name."""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnlab
from cnnlab import rundir as R

TINY = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 6, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 2, "batch_size": 64, "seed": 3, "progress": "off", "threads": 1},
    "output": {"report": False, "name": "tiny"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return cnnlab.train({**TINY, "output": {**TINY["output"], "dir": str(out)}}, quiet=True)


def test_a_trained_folder_is_marked_and_read_back_typed(trained):
    run = trained
    assert isinstance(run, R.RunDir)
    assert R.made_by_cnnlab(run.dir) and R.is_run_dir(run.dir) and R.marker(run.dir)["kind"] == "run"
    fresh = R.load_run(run.dir, finished=True)  # nothing seeded: everything from the files
    assert fresh.config == run.config and fresh.config.train.seed == 3 and fresh.seed == 3
    with open(run.dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in fresh.history] == [int(r["epoch"]) for r in rows] == [1, 2]
    assert fresh.history_columns["val_acc"] == [float(r["val_acc"]) for r in rows]
    assert fresh.metrics == json.loads((run.dir / "metrics.json").read_text()) == run.metrics
    assert fresh.data["classes"] == [str(i) for i in range(10)]
    assert fresh.params == json.loads((run.dir / "model.json").read_text())["total_params"] > 0
    assert len(fresh.predictions) == len(fresh.targets) == fresh.metrics["test"]["n"]
    assert fresh.logits.shape == (len(fresh.targets), 10)


def test_the_model_rebuilt_from_the_checkpoint_predicts_what_the_run_saved(trained):
    run = R.RunDir(trained.dir)
    model = run.load_model("best")
    images, index = run.samples
    d = run.data
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(d["mean"]).view(1, -1, 1, 1)) / torch.tensor(d["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(logits, run.logits[index], rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        R.load_run(run.dir / "checkpoints", finished=True)


def test_folders_without_the_marker(tmp_path):
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "config.yaml").write_text("a: 1\n")
    assert not R.made_by_cnnlab(plain) and not R.is_run_dir(plain)
    (plain / "data.json").write_text("{}")  # a run folder written before markers existed
    assert R.is_run_dir(plain) and not R.made_by_cnnlab(plain)
    made = R.create(tmp_path, "photos")  # the name is taken: a new folder beside it
    assert made.name == "photos-2" and R.made_by_cnnlab(made) and R.is_run_dir(made)
    study = R.create(tmp_path, "s", kind="study")
    assert R.made_by_cnnlab(study) and R.is_study_dir(study) and not R.is_run_dir(study)


def test_writers_replace_whole_files(tmp_path):
    R.write_json(tmp_path / "m.json", {"a": np.float32(0.5), "b": np.arange(2)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": [0, 1]}
    R.write_csv(tmp_path / "t.csv", ["epoch", "val_acc", "id"], [[1, "0.5", "x"], {"epoch": 2, "val_acc": "", "id": "y"}])
    rows = R.read_csv(tmp_path / "t.csv")
    assert rows[0] == {"epoch": 1, "val_acc": 0.5, "id": "x"} and rows[1]["epoch"] == 2 and rows[1]["val_acc"] != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "t.csv"]  # no temporary file left


def _literals(path: Path) -> set[str]:
    """String constants of a module, docstrings excepted."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def test_run_folder_file_names_are_spelled_in_rundir_only():
    src = Path(cnnlab.__file__).parent
    names = {v for k, v in vars(R).items() if k.isupper() and isinstance(v, str) and "." in v}  # the files
    assert {"config.yaml", "history.csv", "best.pt", "metrics.json", "study.json", ".cnnlab-run"} <= names
    where: dict[str, set[str]] = {n: set() for n in names}
    for path in src.rglob("*.py"):
        for lit in _literals(path):
            for n in names:
                if lit == n or lit.endswith("/" + n) or lit.startswith(f".{n}."):  # a name, a path, a temp file
                    where[n].add(str(path.relative_to(src)))
    assert {n: sorted(m) for n, m in where.items() if m != {"rundir.py"}} == {}
