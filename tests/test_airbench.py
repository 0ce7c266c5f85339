"""airbench94's recipe details (issue #16): translate by reflection after normalisation, alternating flip,
its test-time augmentation at the final evaluation, the whitening bias frozen after N epochs, biases
decayed at the weights' rate per step, lookahead from a configurable start. Tiny tensors and digits."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cnnlab import cli
from cnnlab import config as C
from cnnlab.data.loader import Normalizer, alternate_flips, augment_batch
from cnnlab.models.tta import tta_logits
from cnnlab.training import checkpoint as ckpt

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _airbench_crop(padded: torch.Tensor, shifts: torch.Tensor, size: int) -> torch.Tensor:
    """airbench's batch_crop (r <= 2 branch) with given shifts in [-r, r] (rows, cols)."""
    r = (padded.size(-1) - size) // 2
    out = torch.empty((len(padded), padded.size(1), size, size), dtype=padded.dtype)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            m = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[m] = padded[m, :, r + sy:r + sy + size, r + sx:r + sx + size]
    return out


def test_reflect_translate_equals_airbench_after_normalisation():
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    norm = Normalizer(MEAN, STD, torch.device("cpu"))
    aug = C.load(None, ["data.augment.crop_padding=2", "data.augment.crop_padding_mode=reflect"]).data.augment
    ours = norm(augment_batch(x, aug, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)  # the shifts augment_batch drew: rows, then columns, in 0..2p
    dy, dx = torch.randint(0, 5, (48,), generator=g), torch.randint(0, 5, (48,), generator=g)
    ref = _airbench_crop(F.pad(norm(x), (2,) * 4, mode="reflect"), torch.stack([dy - 2, dx - 2], 1), 32)
    assert torch.equal(ours, ref)
    # black padding before normalisation (the old recipe's) is not airbench's
    zeros = C.load(None, ["data.augment.crop_padding=2"]).data.augment
    assert not torch.equal(norm(augment_batch(x, zeros, torch.Generator().manual_seed(3))), ref)


def test_alternating_flip_schedule():
    n = 2000
    e0 = alternate_flips(n, seed=5, epoch=0)
    assert 0.45 < e0.float().mean() < 0.55  # epoch 0: each image at random
    for epoch in range(1, 6):  # odd epochs: every image mirrored relative to epoch 0; even: as epoch 0
        assert torch.equal(alternate_flips(n, 5, epoch), e0 ^ bool(epoch % 2))
    assert not torch.equal(alternate_flips(n, 6, 0), e0)  # seeded
    assert torch.equal(alternate_flips(n, 5, 3), alternate_flips(n, 5, 3))  # a function of (seed, epoch, index)
    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    aug = C.load(None, ["data.augment.hflip=alternate"]).data.augment
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    flip = alternate_flips(n, 5, 1)[idx]
    out = augment_batch(x, aug, torch.Generator().manual_seed(0), flip=flip)
    for i in range(8):
        assert torch.equal(out[i], x[i].flip(2) if flip[i] else x[i])
    with pytest.raises(ValueError, match="alternate"):
        augment_batch(x, aug, torch.Generator().manual_seed(0))


def test_tta_weights_on_a_linear_model():
    """A linear model: the airbench TTA is 0.25 f(x) + 0.25 f(mirror x) + 0.125 for each of the two 1-pixel
    reflect-padded shifts and their mirrors (computed here with numpy's reflect padding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    f = lambda v: model(torch.as_tensor(np.ascontiguousarray(v)))  # noqa: E731
    p = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    up_left, down_right = p[..., :6, :6], p[..., 2:, 2:]
    mirror = lambda v: v[..., ::-1]  # noqa: E731
    xs = x.numpy()
    expect = (0.25 * (f(xs) + f(mirror(xs))) + 0.125 * (f(up_left) + f(mirror(up_left)) + f(down_right)
                                                         + f(mirror(down_right))))
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, x, "airbench").double(), expect.float().double(), atol=1e-5)
        assert torch.allclose(tta_logits(model, x, "flip"), (0.5 * (f(xs) + f(mirror(xs)))).float(), atol=1e-6)
        assert torch.equal(tta_logits(model, x, "none"), model(x).float())
    assert C.tta_mode(C.load(None, ["train.tta_flip=true"]).train) == "flip"  # the older key, an alias
    assert C.tta_mode(C.load(None, ["train.tta_flip=true", "train.tta=airbench"]).train) == "airbench"
    assert C.tta_mode(C.load(None).train) == "none"


def test_norm_and_bias_decay_at_the_weights_rate_per_step():
    from cnnlab.training.optim import param_groups

    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
    o = C.load(None, ["optim.lr=0.5", "optim.weight_decay=0.002", "optim.norm_lr_scale=64",
                      "optim.decay_bias_and_norm=true", "optim.decay_per_step=true"]).optim
    groups = param_groups(m, o)
    per_step = {round(g["lr"] * g["weight_decay"], 12) for g in groups}
    assert len(groups) == 2 and per_step == {0.001}
    coupled = param_groups(m, dataclasses.replace(o, decay_per_step=False))  # as before: 64x the decay per step
    assert [g["lr"] * g["weight_decay"] for g in coupled] == pytest.approx([0.001, 0.064])
    off = param_groups(m, dataclasses.replace(o, decay_bias_and_norm=False))
    assert [g["weight_decay"] for g in off] == [0.002, 0.0, 0.0]  # (weight, conv bias, norm)


def test_whitening_bias_frozen_after_n_epochs_is_untouched_by_steps_and_decay():
    from cnnlab.models import build_model
    from cnnlab.models import hooks
    from cnnlab.training.optim import build_optimizer

    cfg = C.load(None, ["model.name=fastnet", "model.options={widths: [8, 8, 8], whiten_bias_epochs: 2}",
                        "optim.lr=0.1", "optim.weight_decay=0.01", "optim.decay_bias_and_norm=true",
                        "optim.momentum=0.85", "optim.nesterov=true"])
    model = build_model(cfg.model, num_classes=3, in_channels=3, input_size=16)
    assert torch.equal(model.whiten.bias, torch.zeros_like(model.whiten.bias))  # starts at zero
    opt = build_optimizer(model, cfg.optim)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    hooks.init_from_data(model, x)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for epoch in (0, 1):
        hooks.before_epoch(model, epoch)
        assert model.whiten.bias.requires_grad
        before = model.whiten.bias.detach().clone()
        step()
        assert not torch.equal(model.whiten.bias, before)
    frozen = model.whiten.bias.detach().clone()
    other = model.groups[0].conv1.weight.detach().clone()
    for epoch in (2, 3):
        hooks.before_epoch(model, epoch)
        assert not model.whiten.bias.requires_grad
        step()
        step()
    assert torch.equal(model.whiten.bias, frozen) and not torch.equal(model.groups[0].conv1.weight, other)
    with pytest.raises(C.ConfigError, match="whiten_bias_epochs"):
        build_model(dataclasses.replace(cfg.model, options={"whiten_bias_epochs": -1}), num_classes=3, in_channels=3,
                    input_size=16)


def test_lookahead_from_step_0():
    from cnnlab.training.optim import Lookahead
    from cnnlab.training.state import TrainState

    m = nn.Linear(2, 1, bias=False)
    cfg = C.load(None, ["train.lookahead=true", "train.lookahead_start=0", "train.epochs=4"])
    la = TrainState.build(cfg, m, steps_per_epoch=10, device=torch.device("cpu")).lookahead
    assert la.first == 0
    with torch.no_grad():
        m.weight.fill_(1.0)
    la.step(m, 5)  # the first multiple of `every`: the average starts (epoch 0 of 4)
    assert la.state_dict() is not None
    with torch.no_grad():
        m.weight.fill_(3.0)
    la.step(m, 10)
    assert m.weight[0, 0].item() < 3.0  # pulled towards the average within the first epoch
    assert Lookahead(40).first == 12  # the default start: 30% of training, as before


# ---- a real run: fastnet on digits at 16x16, airbench's recipe details on


FAST = {
    "data": {"name": "digits", "val_split": 0.15, "image_size": 16,
             "augment": {"hflip": "alternate", "crop_padding": 2, "crop_padding_mode": "reflect"}},
    "model": {"name": "fastnet", "options": {"widths": [8, 8, 8], "whiten_bias_epochs": 1}},
    "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.85, "nesterov": True, "weight_decay": 0.005,
              "decay_bias_and_norm": True, "decay_per_step": True, "norm_lr_scale": 16},
    "train": {"epochs": 2, "batch_size": 128, "seed": 3, "progress": "off", "threads": 1, "tta": "airbench"},
    "output": {"report": False},
}


def _run(folder, name, **train):
    tree = {**FAST, "train": {**FAST["train"], **train}, "output": {**FAST["output"], "dir": str(folder), "name": name}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(folder / f"{name}.yaml")]) == 0
    return folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("airbench")
    return _run(d, "two"), _run(d, "one", epochs=1)


def test_whitening_bias_trains_one_epoch_then_stays(runs):
    two, one = (ckpt.load(r / "checkpoints/last.pt")["model"] for r in runs)
    assert torch.count_nonzero(one["whiten.bias"]) > 0  # trained in epoch 1
    assert torch.equal(two["whiten.bias"], one["whiten.bias"])  # frozen in epoch 2 (no step, no decay)
    assert not torch.equal(two["groups.0.conv1.weight"], one["groups.0.conv1.weight"])


def test_tta_only_at_the_final_evaluation(runs):
    """history.csv's validation is without TTA; metrics.json's (the final evaluation, on val here) is with it."""
    from cnnlab.data.pipeline import prepare
    from cnnlab.training.loop import evaluate_weights

    run = runs[0]
    cfg = C.load(run / "config.yaml")
    saved = json.loads((run / "data.json").read_text())
    cfg = C.replace(cfg, {"data.mean": saved["mean"], "data.std": saved["std"], "data.check": False})
    splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
    weights = ckpt.load(run / "checkpoints/best.pt")["model"]
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "history.csv", newline="") as f:
        best = [r for r in csv.DictReader(f) if int(r["epoch"]) == metrics["best_epoch"]][0]
    losses = {}
    for mode in ("none", "airbench"):
        logits, targets = evaluate_weights(C.replace(cfg, {"train.tta": mode}), splits, weights, torch.device("cpu"))
        losses[mode] = F.cross_entropy(logits, targets).item()
    assert losses["none"] != pytest.approx(losses["airbench"], abs=1e-4)
    assert float(best["val_loss"]) == pytest.approx(losses["none"], abs=1e-4)
    assert metrics["test"]["loss"] == pytest.approx(losses["airbench"], abs=1e-4)
