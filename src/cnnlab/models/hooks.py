"""The hooks the training loop calls on a model: the whole model <-> trainer contract, in one place.

The loop calls exactly these, explicitly, on the bare model (never on its DDP or torch.compile wrapper):

- `init_from_data(model, images)`: once, after the model is on its device and before the optimizer,
  EMA, SyncBatchNorm or DDP see it. A model that needs data to initialise (fastnet's patch-whitening
  stem) subclasses `InitFromData` and implements `init_from_data(images)`; `images` are normalised
  training images (N, C, H, W) on the model's device. `needs_data(model)` says whether to fetch them.
- `after_train_mode(model)`: right after every `model.train()`. Frozen batch-norm layers (marked by
  `freeze_bn`, as `transfer.freeze` does) go back to eval mode, so their running statistics stay
  those of the pretrained weights; a model subclassing `AfterTrainMode` then runs its own hook.
- `before_epoch(model, epoch)`: at the start of every epoch (0-based; a resumed run calls it for the epoch it
  resumes in), after the optimizer is built. A model subclassing `BeforeEpoch` changes itself by epoch, e.g.
  fastnet freezing its whitening bias after `whiten_bias_epochs` (requires_grad off: no gradient, so the
  optimizer neither moves nor decays it); a function of the epoch only, so resume is exact. Such a model may
  train a varying set of parameters: `trainable_set_varies` (DDP then looks for unused parameters).

Nothing else is looked up on a model by name; the markers survive `copy.deepcopy` (EMA copies).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

FROZEN_BN = "cnnlab_frozen"  # attribute set on a batch-norm layer whose statistics must not move


class InitFromData:
    """Mixin for models initialised from the training data (the loop calls `init_from_data` once)."""

    def init_from_data(self, images: torch.Tensor) -> None:  # images: (N, C, H, W) normalised
        raise NotImplementedError


class AfterTrainMode:
    """Mixin for models with their own step after `model.train()` (runs after frozen BN is restored)."""

    def after_train_mode(self) -> None:
        raise NotImplementedError


class BeforeEpoch:
    """Mixin for models that change at epoch boundaries (the loop calls `before_epoch(epoch)`, 0-based)."""

    def before_epoch(self, epoch: int) -> None:
        raise NotImplementedError


def before_epoch(model: nn.Module, epoch: int) -> None:
    """What the loop calls as each epoch (0-based) starts; a no-op for models without the hook."""
    if isinstance(model, BeforeEpoch):
        model.before_epoch(epoch)


def trainable_set_varies(model: nn.Module) -> bool:
    return isinstance(model, BeforeEpoch)


def needs_data(model: nn.Module) -> bool:
    return isinstance(model, InitFromData)


def init_from_data(model: nn.Module, images: torch.Tensor) -> None:
    """Data-dependent initialisation of `model` from normalised training images; a no-op for other models."""
    if isinstance(model, InitFromData):
        model.init_from_data(images)


def freeze_bn(bn: _BatchNorm) -> None:
    """Mark a batch-norm layer frozen and put it in eval mode (`after_train_mode` keeps it there)."""
    setattr(bn, FROZEN_BN, True)
    bn.eval()


def keep_frozen_bn_eval(model: nn.Module) -> int:
    """Put frozen BatchNorm layers (marked, or with every parameter frozen) back in eval mode; returns
    how many layers it touched. Call right after `model.train()`."""
    n = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            params = list(m.parameters())
            if getattr(m, FROZEN_BN, False) or (params and not any(p.requires_grad for p in params)):
                m.eval()
                n += 1
    return n


def after_train_mode(model: nn.Module) -> None:
    """What the loop calls after `model.train()`: frozen batch norm back to eval, then the model's own hook."""
    keep_frozen_bn_eval(model)
    if isinstance(model, AfterTrainMode):
        model.after_train_mode()
