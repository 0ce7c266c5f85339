"""Every metric in cnnlab.analysis.metrics agrees with scikit-learn to 1e-9, for 2, 10 and 100 classes."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cnnlab.analysis import metrics as M


def _random_case(k: int, n: int, seed: int, absent: int = 0):
    """Random logits/targets; the `absent` last classes are never predicted (and one is never a target)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2.0
    if absent:
        logits[:, k - absent:] -= 100.0  # never the arg-max
    targets = rng.integers(0, k, size=n)
    if absent and k > 2:
        targets[targets == k - 1] = 0  # one class has no support at all
    return logits, targets


CASES = [(2, 50, 0, 0), (2, 40, 1, 1), (10, 300, 2, 0), (10, 200, 3, 3), (100, 1500, 4, 0), (100, 800, 5, 20)]


@pytest.mark.parametrize("k,n,seed,absent", CASES)
def test_matches_sklearn(k, n, seed, absent):
    logits, y = _random_case(k, n, seed, absent)
    pred = M.predictions(logits)
    labels = list(range(k))
    cm = M.confusion_matrix(y, pred, k)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=labels))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about ill-defined precision; we don't
        p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
        rep = skm.classification_report(y, pred, labels=labels, output_dict=True, zero_division=0)
    pc = M.per_class(cm)
    for mine, ref in ((pc["precision"], p), (pc["recall"], r), (pc["f1"], f), (pc["support"], s)):
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-9)

    summ = M.summary(logits, y, [f"c{i}" for i in range(k)])
    json.dumps(summ)  # JSON-able
    for i, row in enumerate(summ["per_class"]):
        ref = rep[str(i)]
        for key in ("precision", "recall", "f1-score", "support"):
            mine = row["f1" if key == "f1-score" else key]
            assert abs(mine - ref[key]) <= 1e-9, (i, key)
    for avg in ("macro", "weighted"):
        ref = rep[f"{avg} avg"]
        for key in ("precision", "recall", "f1-score"):
            assert abs(summ[avg]["f1" if key == "f1-score" else key] - ref[key]) <= 1e-9, (avg, key)
        assert summ[avg]["support"] == ref["support"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_prf = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        for mine, ref_v in zip((summ[avg]["precision"], summ[avg]["recall"], summ[avg]["f1"]), ref_prf[:3]):
            assert abs(mine - ref_v) <= 1e-9
    assert abs(summ["accuracy"] - skm.accuracy_score(y, pred)) <= 1e-9
    assert abs(summ["accuracy"] - rep["accuracy"]) <= 1e-9
    assert summ["confusion"] == cm.tolist()

    # top-k
    prob = M.softmax(logits)
    assert M.top_k_accuracy(logits, y, k) == 1.0
    for kk in sorted({1, 2, 3, 5, k - 1}):
        if kk >= k:
            continue
        if k == 2:
            ref = skm.top_k_accuracy_score(y, prob[:, 1], k=kk, labels=labels)
        else:
            ref = skm.top_k_accuracy_score(y, prob, k=kk, labels=labels)
        assert abs(M.top_k_accuracy(logits, y, kk) - ref) <= 1e-9, kk
    assert ("top5" in summ) == (k > 5)
    if k > 5:
        assert abs(summ["top5"] - skm.top_k_accuracy_score(y, prob, k=5, labels=labels)) <= 1e-9

    # cross-entropy: sklearn's log_loss and torch agree with ours
    if not absent:  # log_loss clips tiny probabilities, so compare only where none is tiny
        assert abs(summ["loss"] - skm.log_loss(y, prob, labels=labels)) <= 1e-9
    ref_ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item()
    assert abs(summ["loss"] - ref_ce) <= 1e-9


def test_no_warnings_on_zero_division():
    cm = np.zeros((3, 3), dtype=np.int64)
    cm[0, 0] = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc = M.per_class(cm)
        M.averages(cm)
        M.summary(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), ["a", "b", "c"])
    assert pc["precision"].tolist() == [1.0, 0.0, 0.0]
    assert pc["f1"].tolist() == [1.0, 0.0, 0.0]


def _ece_reference(logits, y, n_bins=15):
    """The textbook loop (Guo et al. 2017, bins (lo, hi])."""
    prob = M.softmax(logits)
    conf, pred = prob.max(1), prob.argmax(1)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return ece


@pytest.mark.parametrize("k,n,seed,absent", CASES[:4])
def test_ece(k, n, seed, absent):
    logits, y = _random_case(k, n, seed, absent)
    assert abs(M.expected_calibration_error(logits, y) - _ece_reference(logits, y)) <= 1e-9
    b = M.calibration_bins(logits, y)
    assert b["count"].sum() == n and len(b["count"]) == M.ECE_BINS


def test_perfect_and_overconfident_calibration():
    # an always-right, 100%-confident classifier is perfectly calibrated
    y = np.arange(10) % 4
    logits = np.eye(4)[y] * 50.0
    assert M.expected_calibration_error(logits, y) < 1e-9
    # 100% confident and 50% right: ECE = 0.5
    wrong = np.eye(4)[(y + 1) % 4] * 50.0
    mixed = np.concatenate([logits, wrong])
    assert abs(M.expected_calibration_error(mixed, np.concatenate([y, y])) - 0.5) < 1e-9


def test_stable_for_huge_logits_and_bad_input():
    logits = np.array([[1e4, 0.0], [0.0, 1e4]])
    assert math.isfinite(M.cross_entropy(logits, np.array([1, 1])))
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="columns"):
        M.summary(np.zeros((2, 3)), np.array([0, 1]), ["a", "b"])
