"""The run folder's owner (cnnlab.rundir): folders it creates are marked as cnnlab's (is_run_dir /
made_by_cnnlab), its writers are atomic and its CSV reader parses a run's tables one way. (The typed reader
RunDir over a trained run and the "names only in rundir.py" check land with the rest of issue #12 part A.)"""
from __future__ import annotations

import json

import numpy as np

from cnnlab import rundir as R


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
