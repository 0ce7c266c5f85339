"""A model that could not train is reported as a training failure with its gradient norms, not as a label
bug; a planted label-mapping bug still is one. Per-layer gradient norms are logged to grads.csv and read
back as vanishing gradients (a deep sigmoid net trained for real, through the CLI)."""
from __future__ import annotations

import csv
import json

import numpy as np
import yaml

from cnnlab.analysis import diagnose as dg
from cnnlab.analysis import failures, gradients
from inproc import run_cli
from test_diagnose import _train_digits


def _cli(*args, cwd):  # in this process, through the CLI's own main (tests/inproc.py)
    return run_cli(*args, cwd=cwd)


def test_deep_sigmoid_net_is_a_training_failure_with_vanishing_gradients(tmp_path):
    deep = [x for _ in range(10) for x in ({"linear": 32}, "sigmoid")]
    cfg = {"data": {"name": "digits", "val_split": 0.2, "test_split": 0.2},
           "model": {"name": "layers", "layers": ["flatten", *deep, {"linear": "classes"}]},
           "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
           "train": {"epochs": 2, "batch_size": 64, "log_every": 5, "progress": "off"},
           "output": {"dir": str(tmp_path / "runs"), "name": "deep", "tensorboard": False}}
    (tmp_path / "deep.yaml").write_text(yaml.safe_dump(cfg))
    r = _cli("train", "deep.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "deep"
    rows = list(csv.DictReader(open(run / "grads.csv", newline="")))
    layers = [k for k in rows[0] if k not in ("step", "epoch")]
    assert len(layers) == 11 and layers[0] == "1.weight" and layers[-1] == "21.weight"  # input side first
    assert [int(r["step"]) for r in rows] == list(range(5, 5 * len(rows) + 1, 5))
    first, last = np.median([float(r[layers[0]]) for r in rows]), np.median([float(r[layers[-1]]) for r in rows])
    assert first < 1e-3 * last  # what the finding below claims, read from the file itself
    steps = list(csv.DictReader(open(run / "steps.csv", newline="")))
    assert all(0 <= float(s["acc"]) <= 1 for s in steps)  # the batch accuracy beside the loss
    found = json.loads((run / "findings.json").read_text())
    kinds = [f["kind"] for f in found]
    assert "collapsed" in kinds and "vanishing_gradients" in kinds
    assert "dead_class" not in kinds and "rare_class" not in kinds  # not blamed on the labels
    col = next(f for f in found if f["kind"] == "collapsed")
    assert col["severity"] == "error" and "not a label bug" in col["title"]
    assert col["data"]["predicted_classes"] <= 2 and "vanishing" in col["text"] and "1.weight" in col["text"]
    assert (run / "plots" / "grad_norms.png").is_file()


def test_planted_label_swap_is_a_label_bug_not_a_collapse():
    summary = _train_digits((3, 4))
    history = {"train_loss": [2.2, 0.9, 0.5, 0.4]}  # it learnt
    assert failures.collapse(summary, history) is None
    found = dg.diagnose(history, summary)
    assert [f.data["class"] for f in found if f.kind == "dead_class"] == ["digit-3"]
    assert "collapsed" not in [f.kind for f in found]
    assert "the other classes are learnt" in next(f for f in found if f.kind == "dead_class").text


def test_collapse_from_the_confusion_matrix():
    k = 10
    one = np.zeros((k, k), int)
    one[:, 7] = 30  # everything predicted as class 7
    y = np.repeat(np.arange(k), 30)
    logits = np.zeros((len(y), k))
    logits[:, 7] = 1.0
    from cnnlab.analysis import metrics

    summary = metrics.summary(logits, y, [str(i) for i in range(k)])
    c = failures.collapse(summary, {"train_loss": [2.31, 2.30, 2.30]})
    assert c["predicted_classes"] == 1 and abs(c["accuracy"] - 0.1) < 1e-9 and c["loss_drop"] < 0.01
    found = dg.diagnose({"train_loss": [2.31, 2.30, 2.30]}, summary)
    assert found[0].kind == "collapsed" and not [f for f in found if f.kind == "dead_class"]


def test_gradient_health_names_vanishing_and_exploding():
    calm = {"step": [1, 2, 3], "a.weight": [1.0, 0.9, 0.8], "b.weight": [1.0, 1.1, 1.0]}
    assert gradients.gradient_health(calm) is None
    vanish = {"step": [1, 2], "a.weight": [1e-7, 2e-7], "b.weight": [0.5, 0.4]}
    assert gradients.gradient_health(vanish)["kind"] == "vanishing"
    boom = {"step": [1, 2, 3], "a.weight": [0.5, 20.0, 900.0], "b.weight": [1.0, 1.0, 1.0]}
    h = gradients.gradient_health(boom)
    assert h["kind"] == "exploding" and h["layer"] == "a.weight" and h["step"] == 3
    assert gradients.gradient_health({"step": [1], "a.weight": [float("nan")], "b.weight": [1.0]})["kind"] == "exploding"
