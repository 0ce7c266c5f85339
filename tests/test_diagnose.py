"""Diagnostics: overfitting onset on synthetic curves (many noise draws), a planted label-mapping bug found
by name on a really trained model, divergence, underfitting, weak classes, duplicates, healthy runs.

On a real run (test_report.test_real_run_made_to_overfit does this when the trainer is there): train a model
that overfits on purpose (quickstart on 60 training images, no augmentation or weight decay, 30 epochs),
then `cnnlab report runs/quickstart` and check that findings.json's overfitting epoch is within one epoch of
the arg-min of history.csv's val_loss, and that the curves show the red band from there on.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnnlab.analysis import diagnose as dg
from cnnlab.analysis import metrics


def _overfit_history(n: int, vmin: int, noise: float, seed: int) -> dict:
    """Training loss falls throughout; validation loss falls, bottoms out near epoch `vmin`, then climbs."""
    rng = np.random.default_rng(seed)
    e = np.arange(1, n + 1)
    train = 1.8 * np.exp(-e / 4) + 0.05 + rng.normal(0, noise / 3, n)
    val = 0.35 + 0.9 * np.exp(-e / 2.5) + 0.012 * np.maximum(0, e - vmin) ** 1.5 + rng.normal(0, noise, n)
    return {"epoch": e, "train_loss": train, "val_loss": val}


# Short runs need a clear signal: with 12 epochs the rise after the minimum is ~0.1, so only low noise
# is asked of them; the detector is built to stay quiet rather than cry wolf on noisy plateaus.
@pytest.mark.parametrize("n,vmin,noise", [(12, 5, 0.0), (12, 5, 0.01), (20, 8, 0.0), (20, 8, 0.02), (20, 8, 0.05),
                                          (30, 12, 0.01), (30, 12, 0.03), (30, 12, 0.05)])
def test_overfitting_onset_within_one_epoch_of_val_minimum(n, vmin, noise):
    for seed in range(25):
        h = _overfit_history(n, vmin, noise, seed)
        o = dg.overfitting_onset(h)
        assert o is not None, (seed, np.round(h["val_loss"], 3))
        raw_min = int(np.argmin(h["val_loss"])) + 1
        assert abs(o["epoch"] - raw_min) <= 1
        assert o["val_loss_end"] > o["val_loss"] and o["gap_end"] > o["gap_onset"]


def test_no_overfitting_when_validation_keeps_improving_or_is_flat_noise():
    e = np.arange(1, 21)
    false = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        train = 1.8 * np.exp(-e / 4) + 0.05
        improving = {"epoch": e, "train_loss": train, "val_loss": 0.35 + 1.2 * np.exp(-e / 4) + rng.normal(0, 0.03, 20)}
        assert dg.overfitting_onset(improving) is None
        flat = {"epoch": e, "train_loss": train, "val_loss": 0.5 + rng.normal(0, 0.03, 20)}
        false += dg.overfitting_onset(flat) is not None
    assert false <= 3  # pure noise around a plateau: at most a rare false alarm


def test_jump_then_plateau_is_overfitting():
    # a real digits run (60 images, no regularisation): val loss bottoms at epoch 6, jumps, then settles
    # well above its minimum while train loss goes to ~0; the fitted line is flat, the curve never comes back
    v = [2.101, 1.682, 1.105, 0.815, 0.587, 0.493, 0.693, 0.727, 0.89, 0.707, 0.587, 0.6, 0.622, 0.643, 0.654,
         0.658, 0.657, 0.656, 0.654, 0.653, 0.651, 0.65, 0.649, 0.647, 0.646, 0.646, 0.645, 0.646, 0.646, 0.647]
    e = np.arange(1, 31)
    h = {"epoch": e, "val_loss": np.array(v), "train_loss": 2.2 * np.exp(-(e - 1) / 2.0)}
    o = dg.overfitting_onset(h)
    assert o is not None and o["epoch"] == 6
    h["val_loss"][12] = 0.495  # ...but a curve that comes back to its minimum is not called overfitting
    assert dg.overfitting_onset(h) is None or dg.overfitting_onset(h)["epoch"] != 6


def test_onset_needs_epochs_after_it_and_finite_values():
    h = _overfit_history(12, 5, 0.0, 0)
    short = {k: v[:6] for k, v in h.items()}  # the minimum is the last-but-one epoch
    assert dg.overfitting_onset(short) is None
    h["val_loss"][3] = np.nan
    assert dg.overfitting_onset(h) is None
    # training loss rising too is instability, not overfitting
    h = _overfit_history(20, 8, 0.0, 0)
    h["train_loss"] = h["train_loss"][::-1]
    assert dg.overfitting_onset(h) is None


def test_overfitting_finding_names_the_epoch():
    h = _overfit_history(20, 8, 0.01, 3)
    found = dg.diagnose(h, None, best_epoch=9)
    f = next(x for x in found if x.kind == "overfitting")
    assert f.severity == "warning" and f"epoch {f.data['epoch']}" in f.title and f.next


# ----------------------------------------------------------------------------------------------
# A real planted label-mapping bug


def _train_digits(shift: tuple[int, int] | None) -> dict:
    """A small MLP trained on sklearn digits; with `shift`, training labels of class a are replaced by b."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    y_train = y[tr].clone()
    if shift:
        y_train[y_train == shift[0]] = shift[1]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[tr]), y_train).backward()
        opt.step()
    with torch.no_grad():
        logits = model(x[te]).numpy()
    return metrics.summary(logits, y[te].numpy(), [f"digit-{c}" for c in d.target_names])


def test_planted_label_mapping_bug_is_flagged_by_name():
    clean = dg.diagnose(None, _train_digits(None))
    assert not [f for f in clean if f.kind == "dead_class"]
    summary = _train_digits((3, 4))
    found = dg.diagnose(None, summary)
    dead = [f for f in found if f.kind == "dead_class"]
    assert len(dead) == 1 and dead[0].data["class"] == "digit-3" and dead[0].severity == "error"
    assert "'digit-3'" in dead[0].title and "label-mapping" in dead[0].text
    assert dead[0].data["predicted_as"] == "digit-4" and "'digit-4'" in dead[0].text
    assert found[0] is dead[0]  # most serious first
    # the shifted class is not reported a second time as merely "weak"
    assert not [f for f in found if f.kind == "weak_class" and f.data["class"] == "digit-3"]
    pairs = dg.confused_pairs(summary)
    assert (pairs[0]["true"], pairs[0]["pred"]) == ("digit-3", "digit-4")


def _summary_from_cm(cm: np.ndarray) -> dict:
    k = len(cm)
    y = np.repeat(np.repeat(np.arange(k), k), cm.ravel())
    p = np.repeat(np.tile(np.arange(k), k), cm.ravel())
    return metrics.summary(np.eye(k)[p] * 5.0, y, [f"c{i}" for i in range(k)])


def test_weak_and_rare_classes():
    cm = np.diag([50] * 6)
    cm[2] = [10, 0, 20, 20, 0, 0]  # class 2: 40% right, median of others 100%
    found = dg.diagnose(None, _summary_from_cm(cm))
    weak = [f for f in found if f.kind == "weak_class"]
    assert [f.data["class"] for f in weak] == ["c2"]
    cm = np.diag([50] * 4)
    cm[1] = [0, 3, 47, 0]  # predicted 3 times for 50 images: almost never
    found = dg.diagnose(None, _summary_from_cm(cm))
    assert [f.data["class"] for f in found if f.kind == "rare_class"] == ["c1"]


# ----------------------------------------------------------------------------------------------
# Training dynamics and data


def test_divergence_non_finite_and_exploding():
    steps = {"step": [0, 10, 20, 30, 40, 50, 60], "epoch": [1] * 7, "loss": [2.3, 2.2, 2.1, 2.0, 2.1, 9.5, float("nan")],
             "lr": [0.5] * 7}
    d = dg.divergence(steps)
    assert d["kind"] == "exploding" and d["at"] == 50 and d["lr"] == 0.5
    steps["loss"][3] = float("inf")
    d = dg.divergence(steps)
    assert d["kind"] == "non-finite" and d["at"] == 30
    f = dg.diagnose(None, None, steps=steps)[0]
    assert f.kind == "divergence" and f.severity == "error" and "step 30" in f.text and "0.5" in f.text
    # a smoothly falling loss does not diverge, nor does one noisy spike below 3x the start
    ok = {"step": list(range(0, 200, 10)), "loss": list(2.3 * np.exp(-np.arange(20) / 10) + 0.3), "lr": [0.1] * 20}
    ok["loss"][7] = 5.0
    assert dg.divergence(ok) is None
    # without a step log, the epoch losses are checked
    assert dg.divergence(None, {"epoch": [1, 2, 3], "train_loss": [2.3, float("nan"), float("nan")]})["at"] == 2


def test_underfitting():
    e = np.arange(1, 9)
    flat = {"epoch": e, "train_loss": 2.30 - 0.01 * e, "train_acc": 0.1 + 0.002 * e, "val_loss": 2.3 + 0 * e,
            "val_acc": 0.1 + 0 * e}
    f = [x for x in dg.diagnose(flat, None) if x.kind == "underfitting"]
    assert f and "barely" in f[0].title and f"ln 10 = {math.log(10):.3f}" not in f[0].text  # K unknown here
    low = {"epoch": e, "train_loss": 2.3 * np.exp(-e / 3), "train_acc": 0.3 + 0.02 * e, "val_loss": 2.0 - 0.05 * e,
           "val_acc": 0.3 + 0.02 * e}
    f = [x for x in dg.diagnose(low, None) if x.kind == "underfitting"]
    assert f and "low training accuracy" in f[0].title


def test_duplicates_from_data_json_and_healthy_run():
    data = {"findings": [{"severity": "warning", "kind": "duplicate_across_splits", "path": "a.png",
                          "message": "train/a.png equals test/b.png"}] * 5}
    f = [x for x in dg.diagnose(None, None, data_info=data) if x.kind == "duplicates"]
    assert f and f[0].data["count"] == 5 and "train/a.png equals test/b.png" in f[0].text and "(and 2 more)" in f[0].text
    e = np.arange(1, 11)
    good = {"epoch": e, "train_loss": 2 * np.exp(-e / 3), "train_acc": 1 - 0.9 * np.exp(-e / 3),
            "val_loss": 2 * np.exp(-e / 3) + 0.05, "val_acc": 0.97 - 0.9 * np.exp(-e / 2)}
    found = dg.diagnose(good, _summary_from_cm(np.diag([30] * 5)), data_info={"findings": []})
    assert found[0].severity == "ok" and not [x for x in found if x.severity in ("error", "warning")]


# ----------------------------------------------------------------------------------------------
# Both ends (issue 18, item 8): a model stopped early is underfitting, not healthy; its unpredicted classes
# are a model still learning, not five label-mapping bugs; a class far below the others is weak


def _cm(recalls, support=100, seed=0) -> np.ndarray:
    """A confusion matrix with these recalls; each class's mistakes spread at random over the others."""
    rng = np.random.default_rng(seed)
    k = len(recalls)
    cm = np.zeros((k, k), int)
    for i, r in enumerate(recalls):
        cm[i, i] = round(r * support)
        others = [j for j in range(k) if j != i]
        cm[i, others] += rng.multinomial(support - cm[i, i], np.ones(k - 1) / (k - 1))
    return cm


def test_one_epoch_at_low_training_accuracy_is_underfitting():
    one = {"epoch": [1], "train_loss": [1.9], "train_acc": [0.31], "val_loss": [1.7], "val_acc": [0.38]}
    found = dg.diagnose(one, None)
    under = [f for f in found if f.kind == "underfitting"]
    assert under and "31.0%" in under[0].text and "1 epoch" in under[0].text
    assert "healthy" not in [f.kind for f in found]


def test_a_class_at_18_percent_recall_among_classes_at_25_to_60_is_weak():
    recalls = [0.45, 0.55, 0.18, 0.25, 0.30, 0.35, 0.60, 0.45, 0.60, 0.50]  # one epoch of CIFAR-10: widely spread
    weak = [f for f in dg.diagnose(None, _summary_from_cm(_cm(recalls))) if f.kind == "weak_class"]
    assert [f.data["class"] for f in weak] == ["c2"] and "18.0%" in weak[0].text
    # the same shares on 10 images each are within noise of the others: not flagged
    few = [f for f in dg.diagnose(None, _summary_from_cm(_cm([0.4, 0.6, 0.2, 0.3, 0.3, 0.4, 0.6, 0.4, 0.6, 0.5],
                                                            support=10))) if f.kind == "weak_class"]
    assert few == []


def test_classes_unpredicted_by_a_model_still_learning_are_not_label_bugs():
    cm = np.zeros((10, 10), int)  # five classes never predicted: all images go to the first five
    cm[:5, :5] = 4
    cm[:5, :5] += np.diag([12, 8, 10, 6, 8])  # 40 images each, 40-50% right
    cm[5:, :5] = 8
    history = {"epoch": [1, 2], "train_loss": [2.2, 1.9], "train_acc": [0.15, 0.3], "val_acc": [0.2, 0.32]}
    found = dg.diagnose(history, _summary_from_cm(cm))
    assert not [f for f in found if f.kind == "dead_class" or f.severity == "error"]
    (young,) = [f for f in found if f.kind == "unlearnt_classes"]
    assert young.data["never"] == ["c5", "c6", "c7", "c8", "c9"] and "not evidence of a label-mapping bug" in young.text
    assert "5 of 10 classes are (almost) never predicted" in young.text and "30.0%" in young.text
    # one class never predicted while the others are learnt (and the training images fitted): a label bug
    bug = _cm([0.9] * 10, support=40)
    bug[:, 4] += bug[:, 3]
    bug[:, 3] = 0
    history = {"epoch": [1, 2], "train_loss": [1.0, 0.3], "train_acc": [0.7, 0.93]}
    dead = [f for f in dg.diagnose(history, _summary_from_cm(bug)) if f.kind == "dead_class"]
    assert [(f.data["class"], f.severity) for f in dead] == [("c3", "error")]
    # ... but not when that model has not fitted its own training images
    found = dg.diagnose({**history, "train_acc": [0.2, 0.35]}, _summary_from_cm(bug))
    assert not [f for f in found if f.kind == "dead_class"] and "training accuracy reached only 35.0%" in \
        next(f for f in found if f.kind == "unlearnt_classes").text


def test_a_real_one_epoch_run_is_underfitting_and_still_learning_not_mislabelled(tmp_path):
    import cnnlab
    from cnnlab import rundir as R
    from cnnlab.report import build

    tree = {"data": {"name": "digits", "val_split": 0.15, "test_split": 0.2},
            "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu",
                                                   {"maxpool": 2}, "flatten", {"linear": "classes"}]},
            "optim": {"name": "adam", "lr": 0.003},
            "train": {"epochs": 1, "batch_size": 64, "seed": 1, "progress": "off", "threads": 1, "limit_batches": 8},
            "output": {"report": False, "tensorboard": False, "name": "one", "dir": str(tmp_path)}}
    run = cnnlab.train(tree, quiet=True)
    rd = R.RunDir(run.dir)
    train_acc = rd.history_columns["train_acc"]
    test = rd.metrics["test"]
    never = [c["name"] for c, n in zip(test["per_class"], np.asarray(test["confusion"]).sum(0)) if n == 0]
    assert len(train_acc) == 1 and train_acc[0] < 0.5 and never  # what this run is here to show
    found = build.findings(build.gather(run.dir))
    kinds = [f.kind for f in found]
    assert "underfitting" in kinds and "healthy" not in kinds
    assert "dead_class" not in kinds and not [f for f in found if f.severity == "error"]
    assert next(f for f in found if f.kind == "unlearnt_classes").data["never"] == never
