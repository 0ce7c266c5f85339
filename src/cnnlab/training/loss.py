"""The training objective: cross-entropy with optional class weights (`train.class_weights`) and label
smoothing, normalised by the total weight of the whole optimizer step (all micro-batches of
`train.accumulate`, all ranks), so that N micro-batches of B, or W ranks, give exactly the gradient of one
batch of N*B on one process."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.config import Config, ConfigError


def class_weights(cfg: Config, labels, classes: list[str]) -> torch.Tensor | None:
    """The per-class loss weights `train.class_weights` asks for (float32 (K,)), or None for plain
    cross-entropy. `balanced` is scikit-learn's compute_class_weight("balanced"): n / (K * count_c) over the
    training split; a list is taken as given. Refused (naming the key) when the list does not have one weight
    per class, or a class has no training image to balance."""
    spec, k = cfg.train.class_weights, len(classes)
    if spec == "none":
        return None
    if isinstance(spec, tuple):
        if len(spec) != k:
            raise ConfigError(f"train.class_weights={list(spec)}: {len(spec)} weights for {k} classes "
                              f"({', '.join(classes)}); give one weight per class, in this order")
        return torch.tensor(spec, dtype=torch.float32)
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=k)
    if (counts == 0).any():
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        raise ConfigError(f"train.class_weights=balanced: class(es) {', '.join(map(repr, empty))} have no training "
                          "image, so they cannot be balanced; give the weights as a list, or use the default none")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(k), y=y), dtype=torch.float32)


def per_sample(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """(B,) losses, each multiplied by its own class's weight (Keras's class_weight): their sum over a batch
    divided by the batch's total target weight (`total_weight`) is torch's weighted-mean cross-entropy when
    there is no label smoothing. With smoothing, torch's `weight=` would also weight the smoothing term by
    every class's weight, pulling every image towards the rare (heavy) classes: with balanced weights over a
    100x imbalance and smoothing 0.2, a CIFAR-10 net then predicted the rarest class for most images. Here the
    image's whole smoothed loss is scaled by its class's weight. Soft targets (MixUp/CutMix) weigh by their mix."""
    losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    if weight is None:
        return losses
    return losses * (targets @ weight if targets.is_floating_point() else weight[targets])


def total_weight(weight: torch.Tensor | None, targets: torch.Tensor) -> float:
    """Sum of the targets' class weights (their count without weights): the mean's denominator."""
    return float(len(targets)) if weight is None else float(weight.cpu()[targets.cpu()].sum())
