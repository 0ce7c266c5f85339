"""The training loop: reproducible to the byte, resumable to the byte (EMA, schedule, early stopping,
dropout's RNG), sample order a function of (seed, epoch), augmentation a function of (seed, step)."""
from __future__ import annotations

import csv
import json
import os
import random
import signal

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cnnlab.training import checkpoint as ckpt
from cnnlab import cli
from cnnlab.config import AugmentConfig
from cnnlab.data.base import ImageSet
from cnnlab.data.loader import Batches, augment_batch, epoch_order
from cnnlab.models import MODELS

TINY = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2,
             "augment": {"crop_padding": 1, "hflip": True, "cutout": 2}},
    "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"dropout": 0.2}, {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 2, "batch_size": 64, "seed": 7, "progress": "off", "threads": 1},
    "output": {"report": False, "name": "tiny"},
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train(folder, *overrides, name="tiny") -> tuple[int, object]:
    cfg = folder / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output": {**TINY["output"], "dir": str(folder), "name": name}}))
    return cli.main(["train", str(cfg), *overrides]), folder / name


def history(run_dir) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_same_config_and_seed_twice_is_byte_identical(tmp_path):
    (rc1, a), (rc2, b) = train(tmp_path, name="a"), train(tmp_path, name="b")
    assert rc1 == rc2 == 0
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert history(a) == history(b)
    for which in ("last", "best"):
        wa, wb = (ckpt.load(d / "checkpoints" / f"{which}.pt")["model"] for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    pa, pb = np.load(a / "predictions.npz"), np.load(b / "predictions.npz")
    assert np.array_equal(pa["logits"], pb["logits"])
    rc3, c = train(tmp_path, "train.seed=8", name="c")  # and the seed matters
    assert rc3 == 0 and (c / "metrics.json").read_bytes() != (a / "metrics.json").read_bytes()


def test_deterministic_flag_turns_on_deterministic_algorithms(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        rc, _ = train(tmp_path, "train.deterministic=true", "train.epochs=1")
        assert rc == 0
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


# ----------------------------------------------------------------------------------------------
# Exact resume in one process: a test-only model sends SIGTERM to its own process at its k-th training call


FIRED: set = set()


class SignalAt(nn.Module):
    def __init__(self, num_classes, in_channels, input_size, at, sig):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Dropout(0.2),
                                 nn.Linear(8 * input_size * input_size, num_classes))
        self.at, self.sig, self.calls = at, sig, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at and (self.at, self.sig) not in FIRED:  # once per test process
                FIRED.add((self.at, self.sig))
                os.kill(os.getpid(), self.sig)
        return self.net(x)


if "planted_signal" not in MODELS:
    @MODELS.register("planted_signal")
    def _planted_signal(*, num_classes: int, in_channels: int, input_size: int, at: int = 0,
                        sig: int = int(signal.SIGTERM)) -> nn.Module:
        return SignalAt(num_classes, in_channels, input_size, at, sig)


RESUME = ["model.name=planted_signal", "model.layers=null", "train.epochs=5", "train.ema=0.9",
          "schedule.name=step", "schedule.gamma=0.5", "train.label_smoothing=0.1", "train.monitor=val_loss",
          "train.early_stop.patience=2", "train.early_stop.min_delta=100", "train.checkpoint_every_steps=4"]


def test_resume_after_a_signal_restores_everything(tmp_path, capsys):
    """Stopped mid-epoch 3 (EMA on, step schedule, label smoothing, dropout, early stopping counting bad
    epochs), resumed: the same history, metrics.json, weights, EMA weights and optimizer state as an
    uninterrupted run, which stops early after epoch 3."""
    rc, ref = train(tmp_path, *RESUME, name="ref")
    assert rc == 0
    steps = 1222 // 64  # per epoch
    rc, run = train(tmp_path, *RESUME, f"model.options.at={2 * steps + 5}", name="run")
    assert rc == 143 and "stopped by a signal after step 43 (epoch 3)" in capsys.readouterr().err
    stopped = ckpt.load(run / "checkpoints/last.pt")["state"]
    assert stopped["step"] == 2 * steps + 5 and stopped["bad_epochs"] == 1 and stopped["batch_in_epoch"] == 5
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert history(run) == history(ref) and len(history(ref)) == 3
    m = json.loads((run / "metrics.json").read_text())
    assert m["stopped_early"] and m["best_epoch"] == 1
    assert (run / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()
    a, b = ckpt.load(run / "checkpoints/last.pt"), ckpt.load(ref / "checkpoints/last.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert {k: v for k, v in a["state"].items() if k != "history"} == \
        {k: v for k, v in b["state"].items() if k != "history"} | {k: a["state"][k] for k in ("epoch_seconds",
                                                                                    "train_seconds")}  # wall times


def test_resume_with_lookahead_and_norm_lr_scale_is_exact(tmp_path, capsys):
    """airbench's lookahead (its average is part of last.pt) and the batch-norm learning-rate group survive
    a stop mid-epoch 3, after the averaging has started: the same weights, average and history."""
    opts = ["model.name=planted_signal", "model.layers=null", "train.epochs=3", "train.lookahead=true",
            "data.augment.hflip=alternate",  # airbench's alternating flip: a function of (seed, epoch, index)
            "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.85", "optim.nesterov=true", "optim.norm_lr_scale=16",
            "schedule.name=onecycle", "train.checkpoint_every_steps=4"]
    rc, ref = train(tmp_path, *opts, name="ref")
    assert rc == 0
    steps = 1222 // 64
    rc, run = train(tmp_path, *opts, f"model.options.at={2 * steps + 7}", name="run")
    assert rc == 143
    stopped = ckpt.load(run / "checkpoints/last.pt")
    assert stopped["state"]["step"] == 2 * steps + 7 and stopped["lookahead"] is not None  # averaging under way
    assert len(stopped["optimizer"]["param_groups"]) == 3  # weights, biases, batch norm (x16)
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert history(run) == history(ref)
    a, b = ckpt.load(run / "checkpoints/last.pt"), ckpt.load(ref / "checkpoints/last.pt")
    for part in ("model", "lookahead"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["model"][k], a["lookahead"][k]) for k in a["lookahead"])  # copied back at the epoch end


def test_lookahead_averages_after_its_start_and_copies_back():
    from cnnlab.training.optim import Lookahead

    m = nn.Linear(2, 1, bias=False)
    la = Lookahead(total_steps=100, start=0.3, every=5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    la.step(m, 25)  # before 30% of training: nothing
    assert la.state_dict() is None
    la.step(m, 30)  # starts: the average is the current weights
    with torch.no_grad():
        m.weight.fill_(3.0)
    la.step(m, 33)  # not a multiple of `every`
    assert torch.equal(m.weight, torch.full((1, 2), 3.0))
    la.step(m, 35)
    rho = 0.95 ** 5 * 0.35 ** 3
    expect = 1.0 + (3.0 - 1.0) * (1 - rho)
    assert torch.allclose(m.weight, torch.full((1, 2), expect)) and torch.allclose(la.state_dict()["weight"], m.weight)
    with torch.no_grad():
        m.weight.fill_(-7.0)
    la.end_epoch(m)
    assert torch.allclose(m.weight, torch.full((1, 2), expect))


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = ckpt.rng_state()
    ckpt.check_plain(saved)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == first


# ----------------------------------------------------------------------------------------------
# Order and augmentation


def test_epoch_order_is_a_function_of_seed_and_epoch_and_reshuffles():
    a = epoch_order(1000, 0, 0)
    assert torch.equal(a, epoch_order(1000, 0, 0))
    assert sorted(a.tolist()) == list(range(1000))
    assert not torch.equal(a, epoch_order(1000, 0, 1))  # every epoch a new order
    assert not torch.equal(a, epoch_order(1000, 1, 0))


def test_augmentation_depends_only_on_seed_and_step_and_slices_match_the_global_batch():
    aug = AugmentConfig(hflip=True, crop_padding=2, cutout=3)
    x = torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    full = augment_batch(x, aug, gen())
    assert torch.equal(full, augment_batch(x, aug, gen()))
    assert not torch.equal(full, augment_batch(x, aug, torch.Generator().manual_seed(6)))
    # a rank's slice, augmented with the global batch's draws, is those rows of the 1-process batch
    assert torch.equal(torch.cat([augment_batch(x[:7], aug, gen(), offset=0, total=13),
                                  augment_batch(x[7:], aug, gen(), offset=7, total=13)]), full)


def test_ranks_split_each_global_batch_and_resume_mid_epoch():
    s = ImageSet(labels=np.arange(23) % 3, classes=["a", "b", "c"], images=torch.zeros(23, 1, 4, 4, dtype=torch.uint8),
                 ids=[str(i) for i in range(23)])
    order = epoch_order(23, 0, 0)
    kw = dict(batch_size=5, device=torch.device("cpu"), channels=1, size=4, drop_last=True)
    one = [i for _, _, i in Batches(s, **kw).iterate(order)]
    ranks = [[i for _, _, i in Batches(s, rank=r, world=2, **kw).iterate(order)] for r in range(2)]
    assert len(one) == 4  # 23 // 5, the partial batch dropped
    for j, batch in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][j], ranks[1][j]]), batch)  # 3 + 2 of every 5
    resumed = [i for _, _, i in Batches(s, **kw).iterate(order, start_batch=2)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, one[2:], strict=True))
    b = Batches(s, rank=1, world=2, **kw)
    assert [b.global_size(i, 23) for i in range(5)] == [5, 5, 5, 5, 3] and b.local_offset(0) == 3


def test_progress_lines_in_long_epochs_with_eta(capsys, monkeypatch):
    from cnnlab.training import runlog as R

    clock = iter(range(0, 10_000, 10))  # 10 s between calls
    monkeypatch.setattr(R.time, "perf_counter", lambda: float(next(clock)))
    p = R.Progress("lines", total_steps=100, epochs=2, every_s=30)
    for step in range(0, 8):
        p.step(step, 0.5)
    p.epoch({"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.6, "val_acc": 0.8, "lr": 0.1,
             "seconds": 70.0})
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.strip().startswith("step")]
    # the clock reads 0 at start, 10 at step 0, 30 at step 2: 10 s a step, 98 steps to go; then every 30 s
    assert [line.strip() for line in steps] == ["step 2/100  loss 0.5000  ETA 16m20s",
                                                "step 5/100  loss 0.5000  ETA 15m50s"]
    assert out[-1].startswith("epoch   1/2")
    R.Progress("off", 100, 2, every_s=0).step(5, 0.1)
    assert capsys.readouterr().out == ""


def test_channels_last_auto_follows_the_measured_rule(tmp_path):
    from cnnlab import config as C
    from cnnlab.training import loop as T
    from cnnlab.models import build_model

    def net(name, c, s):
        return build_model(C.load(None, [f"model.name={name}"]).model, num_classes=10, in_channels=c, input_size=s)

    lenet, conv4, cpu = net("lenet5", 1, 28), net("cifar_convnet", 3, 32), torch.device("cpu")
    auto = C.load(None)
    assert auto.train.channels_last == "auto"
    assert not T.use_channels_last(auto, lenet, cpu)  # widest conv 16: NCHW (2x faster with batch norm)
    assert T.use_channels_last(auto, conv4, cpu) and T.use_channels_last(auto, lenet, torch.device("cuda"))
    assert not T.use_channels_last(auto, nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), cpu)
    on, off = C.load(None, ["train.channels_last=true"]), C.load(None, ["train.channels_last=off"])
    assert on.train.channels_last == "on" and T.use_channels_last(on, lenet, cpu)  # older configs said true
    assert not T.use_channels_last(off, conv4, cpu)
    with pytest.raises(C.ConfigError, match="train.channels_last"):
        C.load(None, ["train.channels_last=sometimes"])
    # the run's final evaluation and `cnnlab eval` use the layout the model trained in: the same logits
    code, run = train(tmp_path, "train.channels_last=on", "train.epochs=1")
    assert code == 0 and cli.main(["eval", str(run)]) == 0
    first = np.load(run / "predictions.npz")["logits"]
    again = np.load(run / "evals" / "1" / "predictions.npz")["logits"]
    np.testing.assert_array_equal(first, again)
