"""The model hooks the loop calls (models/hooks.py), seen from a real training run: `init_from_data` once
with the normalised training images, `after_train_mode` after every model.train(), frozen batch norm kept
in eval mode through training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cnnlab import cli
from cnnlab.models import MODELS, hooks
from cnnlab.training import checkpoint as ckpt

CONFIG = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 4, "k": 3, "padding": 1}}, "batchnorm", "relu",
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "sgd", "lr": 0.05},
    "train": {"epochs": 2, "batch_size": 128, "seed": 3, "progress": "off", "threads": 1},
    "output": {"report": False, "name": "h"},
}


class Probe(hooks.InitFromData, hooks.AfterTrainMode, nn.Module):
    """Records what the loop hands it: the images' count, per-channel mean and std; the train-mode calls."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int):
        super().__init__()
        self.fc = nn.Linear(in_channels * input_size * input_size, num_classes)
        self.register_buffer("seen_n", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seen_mean", torch.zeros(in_channels, dtype=torch.float64))
        self.register_buffer("seen_std", torch.zeros(in_channels, dtype=torch.float64))
        self.register_buffer("train_calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.fc(x.flatten(1))

    def init_from_data(self, images):
        x = images.double()
        self.seen_n += len(x)
        self.seen_mean.copy_(x.mean(dim=(0, 2, 3)))
        self.seen_std.copy_(x.std(dim=(0, 2, 3), unbiased=False))

    def after_train_mode(self):
        self.train_calls += 1


def _hook_probe(*, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    return Probe(num_classes, in_channels, input_size)


@pytest.fixture(autouse=True)
def _probe_and_threads(monkeypatch):
    # registered only while a test here runs: the tests parametrized over every model never see it
    monkeypatch.setitem(MODELS._items, "hook_probe", _hook_probe)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "h.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "output": {**CONFIG["output"], "dir": str(tmp_path)}}))
    assert cli.main(["train", str(cfg), *overrides]) == 0
    return tmp_path / "h"


def test_the_loop_calls_init_from_data_once_with_normalised_training_images_and_after_train_each_epoch(tmp_path):
    run = train(tmp_path, "model.name=hook_probe", "model.layers=null")
    w = ckpt.load(run / "checkpoints" / "last.pt")["model"]
    n_train = len(np.load(run / "splits.npz")["train_index"])
    assert int(w["seen_n"]) == n_train  # the whole training split (under 5,000 images), once
    # normalised with the training split's own statistics: mean 0, std 1 per channel
    assert torch.allclose(w["seen_mean"], torch.zeros(1, dtype=torch.float64), atol=1e-4), w["seen_mean"]
    assert torch.allclose(w["seen_std"], torch.ones(1, dtype=torch.float64), atol=1e-4), w["seen_std"]
    assert int(w["train_calls"]) == 2  # after model.train(), once per epoch


def test_frozen_batch_norm_keeps_its_statistics_through_training(tmp_path):
    run = train(tmp_path, "model.freeze=backbone")
    first, last = (ckpt.load(run / "checkpoints" / f"{w}.pt")["model"] for w in ("best", "last"))
    for w in (first, last):
        assert torch.equal(w["1.running_mean"], torch.zeros(4)) and torch.equal(w["1.running_var"], torch.ones(4))
        assert int(w["1.num_batches_tracked"]) == 0
    # without the freeze, the same layer's statistics move
    run2 = train(tmp_path / "free")
    assert not torch.equal(ckpt.load(run2 / "checkpoints" / "last.pt")["model"]["1.running_mean"], torch.zeros(4))


def test_fastnet_stem_is_set_from_the_data_by_the_loop(tmp_path):
    run = train(tmp_path, "model.name=fastnet", "model.layers=null", "model.options.widths=[8, 8, 8]",
                "data.channels=3", "data.image_size=32", "train.epochs=1", "train.limit_batches=1")
    w = ckpt.load(run / "checkpoints" / "last.pt")["model"]["whiten.weight"]  # (24, 3, 2, 2): +filters, -filters
    assert torch.equal(w[12:], -w[:12]) and w.abs().sum() > 0
    torch.manual_seed(3)
    fresh = MODELS.get("fastnet")(num_classes=10, in_channels=3, input_size=32, widths=[8, 8, 8]).whiten.weight
    assert not torch.equal(fresh[12:], -fresh[:12])  # a freshly built stem is not that


def test_fastnet_whitening_is_fitted_to_the_whole_training_split_even_when_stored_class_by_class():
    # issue #16 item 1: data stored class by class (the CIFAR-10 zip) whose classes differ in colour; the
    # stem was fitted to images[:5000], i.e. to the first classes only, and its channels' variances on
    # the whole set came out far from 1. Fitted to a seeded sample across the split, they are about 1.
    from cnnlab.models.fast import FastNet
    from cnnlab.training.loop import _init_sample

    g = torch.Generator().manual_seed(0)
    images = torch.cat([(torch.rand(1000, 3, 32, 32, generator=g) * 80 + 17 * c).to(torch.uint8)
                        for c in range(10)])  # 10 classes x 1,000 images, in class order, each brighter
    x = images.float() / 255
    norm = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    train = type("Train", (), {"images": images, "__len__": lambda self: len(images)})()  # an in-memory split
    splits = type("Splits", (), {"train": train})()
    sample = _init_sample(splits, None, seed=5)
    assert len(sample) == 5000 and torch.equal(sample, _init_sample(splits, None, seed=5))  # seeded
    picked = (sample.float().mean(dim=(1, 2, 3)) - 40) / 17  # the class each picked image came from
    assert torch.bincount(picked.round().clamp(0, 9).long(), minlength=10).min() > 350  # every class drawn
    net = FastNet(10, 3, widths=(8, 8, 8))
    sample_n = (sample.float() / 255 - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    net.init_from_data(sample_n)
    with torch.no_grad():
        second = net.whiten(norm[::4]) - net.whiten.bias[None, :, None, None]
        var = second.pow(2).mean(dim=(0, 2, 3))[:12]  # the + filters (the - ones mirror them)
    assert var.min() > 0.9 and var.max() < 1.1, var
