"""The CLI pieces the classic experiments use: one variation of a study (`train --variation`), evaluation on
chosen splits (`eval --split`, the training split in eval mode), feature maps for a picked image and
channels (`report --image --channels`), and a validation split of the last N images (`data.val_from`)."""
from __future__ import annotations

import csv
import json

import numpy as np
import yaml

from cnnlab.data.pipeline import carve_last
from inproc import run_cli


def _cli(*args, cwd):  # in this process, through the CLI's own main (tests/inproc.py)
    return run_cli(*args, cwd=cwd)


def _main(*args, cwd, monkeypatch, capsys):  # in this process: the refusals need no fresh interpreter
    from cnnlab import cli

    monkeypatch.chdir(cwd)
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def test_variation_eval_splits_and_picked_feature_maps(tmp_path, monkeypatch, capsys):
    cfg = {"data": {"name": "digits", "image_size": 16, "val_split": 0.2, "test_split": 0.2, "val_from": "last"},
           "model": {"name": "layers", "layers": [{"conv": {"out": 6, "padding": 1}}, "relu", {"maxpool": 2},
                                                  {"linear": "classes"}]},
           "optim": {"name": "adam", "lr": 0.01},
           "train": {"epochs": 1, "batch_size": 64, "progress": "off"},
           "output": {"dir": str(tmp_path / "runs"), "tensorboard": False},
           "variations": {"a": {}, "b": {"optim.lr": 0.003}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    r = _cli("train", "s.yaml", "--variation", "b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "s" / "b"
    assert (run / "metrics.json").is_file() and not (tmp_path / "runs" / "s" / "a").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.003
    data = json.loads((run / "data.json").read_text())
    # digits is not in class order: the last 20% of what test_split left are the validation images
    assert data["sizes"]["val"] == round(0.2 * (data["sizes"]["train"] + data["sizes"]["val"]))
    code, err = _main("train", "s.yaml", "--variation", "c", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "'c' is not a variation" in err and "a, b" in err

    r = _cli("eval", str(run), "--split", "val,train", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    val = json.loads((run / "evals" / "1" / "metrics.json").read_text())
    train = json.loads((run / "evals" / "2" / "metrics.json").read_text())
    assert (val["eval_split"], train["eval_split"]) == ("val", "train")
    assert sum(map(sum, val["test"]["confusion"])) == data["sizes"]["val"]
    assert sum(map(sum, train["test"]["confusion"])) == data["sizes"]["train"]
    hist = list(csv.DictReader(open(run / "history.csv")))
    assert abs(val["test"]["accuracy"] - float(hist[-1]["val_acc"])) < 1e-6  # the same model, the same split

    rows = list(csv.DictReader(open(run / "predictions.csv")))
    saved = np.load(run / "samples.npz")["index"]
    pick = int(saved[3])
    r = _cli("report", str(run), "--image", str(pick), "--channels", "0,2,5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "plots" / "feature_maps.png").is_file()
    html = (run / "report.html").read_text()
    assert f"Channels 0, 2, 5 of each conv stage for image {pick}" in html
    assert rows[pick]["index"] == str(pick)
    missing = next(i for i in range(len(rows)) if i not in set(saved.tolist()))
    code, err = _main("report", str(run), "--image", str(missing), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and f"--image {missing}: not among the images saved" in err


def test_val_from_last_takes_the_tail_in_order():
    keep, held = carve_last(np.arange(10) % 3, 3, "val_split")
    assert keep.tolist() == list(range(7)) and held.tolist() == [7, 8, 9]
    keep, held = carve_last(np.zeros(50, int), 0.1, "val_split")
    assert held.tolist() == [45, 46, 47, 48, 49]
