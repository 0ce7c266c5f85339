"""Temperature scaling (Guo et al., 2017): one scalar T > 0 that divides the logits, fitted by minimising the
negative log-likelihood on held-out (validation) predictions. It changes confidences, never the predicted
class. Pure numpy/scipy functions of (logits, targets); the run-level flow is training/calibrate.py."""
from __future__ import annotations

import math

import numpy as np

from cnnlab.analysis import metrics as M

LOG_T_RANGE = (-4.0, 5.0)  # T between e^-4 (0.018) and e^5 (148): beyond that the logits are degenerate


def fit_temperature(logits, targets) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits, targets): a bounded 1-D search on log T
    (scipy's minimize_scalar; the NLL is convex in 1/T). 1.0 when there is nothing to fit on."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    if len(y) == 0 or not np.isfinite(z).all():
        return 1.0
    res = minimize_scalar(lambda log_t: M.cross_entropy(z / math.exp(log_t), y), bounds=LOG_T_RANGE,
                          method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


def scaled(logits, temperature: float) -> np.ndarray:
    """The logits divided by the temperature (their softmax is the calibrated probabilities)."""
    return np.asarray(logits, dtype=np.float64) / float(temperature)


def report(logits, targets, temperature: float) -> dict:
    """ECE and NLL of (logits, targets) before and after dividing by `temperature`."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    after = scaled(z, temperature)
    return {"n": int(len(y)), "ece_before": M.expected_calibration_error(z, y),
            "ece_after": M.expected_calibration_error(after, y),
            "nll_before": M.cross_entropy(z, y), "nll_after": M.cross_entropy(after, y)}
