"""The training knobs: class-weighted loss, the balanced sampler, gradient accumulation, clipping, optimizers
by name with their arguments, warm-up and ReduceLROnPlateau. Tiny nets on 8x8 digits, in one process."""
from __future__ import annotations

import csv
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cnnlab import cli
from cnnlab import config as C
from cnnlab.data.loader import epoch_order
from cnnlab.models import MODELS
from cnnlab.training import checkpoint as ckpt
from cnnlab.training import loss as L
from cnnlab.training.optim import build_optimizer, build_scheduler

# no batch norm, no dropout: N micro-batches of B then compute what one batch of N*B computes
NET = {"name": "layers", "layers": [{"conv": {"out": 6, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                    "flatten", {"linear": "classes"}]}
BASE = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2, "augment": {"crop_padding": 1, "hflip": True}},
    "model": NET,
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"epochs": 1, "batch_size": 64, "seed": 5, "progress": "off", "threads": 1},
    "output": {"report": False},
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train(folder, name, *overrides):
    cfg = folder / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "output": {**BASE["output"], "dir": str(folder), "name": name}}))
    return cli.main(["train", str(cfg), *overrides]), folder / name


def history(run_dir) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# Class weights


def test_class_weighted_loss_equals_a_hand_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(40, 4, generator=g) * 3, torch.randint(0, 4, (40,), generator=g)
    w = torch.tensor([0.5, 2.0, 1.0, 4.0])
    logp = torch.log_softmax(logits.double(), 1)
    hand = -(w.double()[y] * logp[torch.arange(40), y]).sum() / w.double()[y].sum()
    ours = L.per_sample(logits, y, w).sum() / L.total_weight(w, y)
    assert abs(ours.item() - hand.item()) < 1e-6
    assert abs(ours.item() - F.cross_entropy(logits, y, weight=w).item()) < 1e-6  # torch's weighted mean
    plain = L.per_sample(logits, y, None).sum() / L.total_weight(None, y)
    assert abs(plain.item() - F.cross_entropy(logits, y).item()) < 1e-6
    # with label smoothing each image's whole smoothed loss is scaled by its own class's weight (torch's weight=
    # would weight the smoothing term by every class's weight, pulling all images towards the heavy classes)
    smooth = -(0.9 * logp[torch.arange(40), y] + 0.1 * logp.mean(1))
    ours = L.per_sample(logits, y, w, label_smoothing=0.1)
    assert torch.allclose(ours.double(), w.double()[y] * smooth, atol=1e-5)
    # soft targets (MixUp): weighted by their mix of classes
    soft = F.one_hot(y, 4).float() * 0.7 + F.one_hot(y.roll(1), 4).float() * 0.3
    hand = -(soft.double() * logp).sum(1) * (soft.double() @ w.double())
    assert torch.allclose(L.per_sample(logits, soft, w).double(), hand, atol=1e-5)


def test_balanced_class_weights_are_scikit_learns_and_a_list_needs_one_per_class():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 50 + [1] * 20 + [2] * 5)
    cfg = C.load(None, ["train.class_weights=balanced"])
    got = L.class_weights(cfg, y, ["a", "b", "c"]).numpy()
    assert np.allclose(got, compute_class_weight("balanced", classes=np.arange(3), y=y))
    assert np.allclose(got, len(y) / (3 * np.bincount(y)))
    assert L.class_weights(C.load(None), y, ["a", "b", "c"]) is None
    assert L.class_weights(C.load(None, ["train.class_weights=[1, 2, 3]"]), y, ["a", "b", "c"]).tolist() == [1, 2, 3]
    with pytest.raises(C.ConfigError, match=r"train.class_weights.*2 weights for 3 classes"):
        L.class_weights(C.load(None, ["train.class_weights=[1, 2]"]), y, ["a", "b", "c"])
    with pytest.raises(C.ConfigError, match=r"train.class_weights.*'c'.*no training"):
        L.class_weights(cfg, y[y < 2], ["a", "b", "c"])
    for bad in ("train.class_weights=[-1, 2]", "train.class_weights=balance"):
        with pytest.raises(C.ConfigError, match="train.class_weights"):
            C.load(None, [bad])


def test_a_wrong_weight_count_is_refused_before_the_run_folder(tmp_path, capsys):
    assert cli.main(["train", "examples/quickstart.yaml", "train.class_weights=[1, 2]",
                     f"output.dir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert "train.class_weights" in err and "10 classes" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# The balanced sampler


def test_balanced_sampler_draws_every_class_equally_often_per_epoch():
    y = np.repeat(np.arange(4), [8000, 1500, 400, 100])  # 80:1 between the largest and the rarest class
    for epoch in range(3):
        order = epoch_order(len(y), 11, epoch, balance=y)
        assert len(order) == len(y)
        freq = np.bincount(y[order.numpy()], minlength=4) / len(y)
        assert np.all(np.abs(freq - 0.25) <= 0.05 * 0.25), freq  # within 5% of uniform
    assert torch.equal(epoch_order(len(y), 11, 1, balance=y), epoch_order(len(y), 11, 1, balance=y))
    assert not torch.equal(epoch_order(len(y), 11, 1, balance=y), epoch_order(len(y), 11, 2, balance=y))
    plain = epoch_order(len(y), 11, 0)
    assert sorted(plain.tolist()) == list(range(len(y)))  # the default stays a permutation


FIRED: set = set()


class SignalAt(nn.Module):
    """Sends SIGTERM to its own process at its k-th training call (once per test process)."""

    def __init__(self, num_classes, in_channels, input_size, at):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(6 * input_size * input_size, num_classes))
        self.at, self.calls = at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at and self.at not in FIRED:
                FIRED.add(self.at)
                os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


if "knobs_signal" not in MODELS:
    @MODELS.register("knobs_signal")
    def _knobs_signal(*, num_classes: int, in_channels: int, input_size: int, at: int = 0) -> nn.Module:
        return SignalAt(num_classes, in_channels, input_size, at)


KNOBS = ["model.name=knobs_signal", "model.layers=null", "train.epochs=2", "data.sampler=balanced",
         "train.class_weights=balanced", "train.accumulate=2", "train.batch_size=32", "train.clip_grad.norm=0.5",
         "schedule.name=plateau", "schedule.warmup_epochs=0.5", "train.checkpoint_every_steps=3"]


def test_sampler_weights_accumulation_and_clipping_resume_exactly_mid_epoch(tmp_path, capsys):
    """Stopped by SIGTERM mid-epoch 2 and resumed: the same drawn order (the same history and weights) as a run
    never stopped, with the balanced sampler, class weights, accumulation, clipping, warm-up and plateau on."""
    rc, ref = train(tmp_path, "ref", *KNOBS)
    assert rc == 0
    micro = 1222 // 32  # micro-batches per epoch (the last, partial one dropped)
    rc, run = train(tmp_path, "run", *KNOBS, f"model.options.at={micro + 9}")
    assert rc == 143
    stopped = ckpt.load(run / "checkpoints/last.pt")["state"]
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] == 10 and stopped["step"] == -(-micro // 2) + 5
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert history(run) == history(ref) and len(history(ref)) == 2
    a, b = ckpt.load(run / "checkpoints/last.pt"), ckpt.load(ref / "checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (run / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and clipping


def test_accumulated_micro_batches_give_the_weights_of_one_large_batch(tmp_path):
    """4 micro-batches of 16 = 1 batch of 64, to 1e-5 after 2 epochs (38 optimizer steps), with augmentation
    (drawn for the step's 64 images), balanced class weights (divided by the step's total weight), momentum
    and a cosine schedule (stepped per optimizer step). 1,222 training images: 19 steps of 64 either way."""
    common = ["train.class_weights=balanced", "schedule.name=cosine", "train.epochs=2"]
    rc1, big = train(tmp_path, "big", *common, "train.batch_size=64")
    rc2, acc = train(tmp_path, "acc", *common, "train.batch_size=16", "train.accumulate=4")
    assert rc1 == rc2 == 0
    a, b = ckpt.load(big / "checkpoints/last.pt"), ckpt.load(acc / "checkpoints/last.pt")
    assert a["state"]["step"] == b["state"]["step"] == 2 * 19
    first = ckpt.load(big / "checkpoints/best.pt")["model"]
    assert any(not torch.equal(first[k], a["model"][k]) for k in first) or a["state"]["best_epoch"] == 2
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff < 1e-5, diff
    for ra, rb in zip(history(big), history(acc)):
        assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-5
        assert ra["lr"] == rb["lr"]
    # and accumulation is not a no-op: 16-image steps without it end elsewhere
    rc3, small = train(tmp_path, "small", *common, "train.batch_size=16")
    assert rc3 == 0
    c = ckpt.load(small / "checkpoints/last.pt")["model"]
    assert max((a["model"][k] - c[k]).abs().max().item() for k in c) > 1e-3


def test_the_share_of_clipped_steps_is_logged_per_epoch(tmp_path):
    rc, tight = train(tmp_path, "tight", "train.clip_grad.norm=1e-4", "train.epochs=2")
    rc2, loose = train(tmp_path, "loose", "train.clip_grad.value=1e4")
    rc3, plain = train(tmp_path, "plain")
    assert rc == rc2 == rc3 == 0
    assert [r["clipped"] for r in history(tight)] == ["1", "1"]
    assert [r["clipped"] for r in history(loose)] == ["0"]
    assert "clipped" not in history(plain)[0]
    with pytest.raises(C.ConfigError, match="train.clip_grad.*not both"):
        C.load(None, ["train.clip_grad.norm=1", "train.clip_grad.value=1"])
    with pytest.raises(C.ConfigError, match="train.clip_grad.norm"):
        C.load(None, ["train.clip_grad.norm=0"])


def test_clipping_by_norm_and_by_value_bounds_the_step():
    model = nn.Linear(3, 2, bias=False)
    for over, bound in ((["train.clip_grad.norm=0.01"], "norm"), (["train.clip_grad.value=0.001"], "value")):
        from cnnlab.training.state import TrainState

        cfg = C.load(None, ["optim.momentum=0", "optim.lr=1", *over])
        ts = TrainState.build(cfg, model, steps_per_epoch=1, device=torch.device("cpu"))
        before = model.weight.detach().clone()
        assert ts.update((model(torch.ones(4, 3)) * 100).sum(), 1) is True
        delta = model.weight.detach() - before  # lr 1, no momentum: the clipped gradient itself
        if bound == "norm":
            assert abs(delta.norm().item() - 0.01) < 1e-6
        else:
            assert torch.allclose(delta.abs(), torch.full_like(delta, 0.001), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Optimizers by name, warm-up, plateau


def test_optimizers_by_name_with_their_arguments():
    m = nn.Linear(2, 2)
    opt = build_optimizer(m, C.load(None, ["optim.name=rmsprop", "optim.args={alpha: 0.9}"]).optim)
    assert type(opt) is torch.optim.RMSprop and opt.defaults["alpha"] == 0.9
    opt = build_optimizer(m, C.load(None, ["optim.name=Adagrad", "optim.args={lr_decay: 0.01}", "optim.lr=0.3"]).optim)
    assert type(opt) is torch.optim.Adagrad and opt.defaults["lr_decay"] == 0.01 and opt.defaults["lr"] == 0.3
    assert type(build_optimizer(m, C.load(None, ["optim.name=nadam"]).optim)) is torch.optim.NAdam
    with pytest.raises(C.ConfigError) as e:
        build_optimizer(m, C.load(None, ["optim.name=Adagrad", "optim.args={alpah: 0.9}"]).optim)
    assert "optim.args" in str(e.value) and "lr_decay" in str(e.value)


def test_an_unknown_optimizer_is_refused_naming_the_key_and_the_choices(tmp_path, capsys):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, ["optim.name=rmsprob"])
    msg = str(e.value)
    assert "optim.name" in msg and "rmsprob" in msg and "RMSprop" in msg and "Adagrad" in msg and "NAdam" in msg
    assert "LBFGS" not in msg  # needs a closure: not offered
    assert cli.main(["train", "examples/quickstart.yaml", "optim.name=Adamm", f"output.dir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert "optim.name" in err and "'Adam'" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    # arguments the optimizer does not take: refused before any work too
    assert cli.main(["train", "examples/quickstart.yaml", "optim.name=rmsprop", "optim.args={betas: [0.9, 0.9]}",
                     f"output.dir={tmp_path}/runs"]) == 2
    assert "optim.args" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def _lrs(sched_over, epochs=3, spe=4, metrics=None):
    m = nn.Linear(2, 2)
    cfg = C.load(None, ["optim.lr=0.1", *sched_over])
    opt = build_optimizer(m, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule, cfg.optim, epochs=epochs, steps_per_epoch=spe, monitor=cfg.train.monitor)
    out = []
    for e in range(epochs):
        for _ in range(spe):
            out.append(round(opt.param_groups[0]["lr"], 6))
            opt.step()
            sched.step()
        if metrics is not None:
            sched.epoch_end(metrics[e])
    return out


def test_warmup_before_any_schedule():
    assert _lrs(["schedule.warmup_epochs=1"]) == [0.025, 0.05, 0.075, 0.1] + [0.1] * 8
    # step decays counted from the warm-up's end (SequentialLR's convention)
    assert _lrs(["schedule.name=step", "schedule.gamma=0.5", "schedule.warmup_epochs=0.5"], spe=4) == \
        [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025]
    # plateau: torch's LinearLR warm-up, then the validation metric decides
    assert _lrs(["schedule.name=plateau", "schedule.warmup_epochs=1"], metrics=[0.5, 0.6, 0.7]) == \
        [0.025, 0.05, 0.075, 0.1] + [0.1] * 8


def test_reduce_on_plateau_lowers_the_rate_when_the_metric_stalls(tmp_path):
    lrs = _lrs(["schedule.name=plateau", "schedule.patience=1", "schedule.gamma=0.5"], epochs=5, spe=1,
               metrics=[0.5, 0.6, 0.6, 0.6, 0.6])
    assert lrs == [0.1, 0.1, 0.1, 0.1, 0.05]  # two epochs without improvement (more than patience 1): halved
    # through training, on val_loss: at a rate too small to move the loss, no epoch improves on the first
    # (by torch's relative 1e-4), so with patience 0 the rate is cut after epoch 2
    rc, run = train(tmp_path, "plateau", "schedule.name=plateau", "schedule.patience=0", "train.monitor=val_loss",
                    "optim.lr=1e-6", "optim.momentum=0", "train.epochs=3", "train.limit_batches=2")
    assert rc == 0
    assert [float(r["lr"]) for r in history(run)] == pytest.approx([1e-6, 1e-6, 1e-7])


# ----------------------------------------------------------------------------------------------
# Imbalance in the report


def _imbalanced_run():
    from cnnlab.analysis.metrics import summary

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [300, 100, 30])
    logits = rng.normal(0, 1, (len(y), 3))
    logits[np.arange(len(y)), y] += np.where(y == 2, 0.2, 3.0)  # the rare class is poorly recalled
    classes = ["cat", "dog", "owl"]
    data = {"counts": {"train": {"cat": 3000, "dog": 1000, "owl": 60}, "test": {"cat": 300, "dog": 100, "owl": 30}}}
    return summary(logits, y, classes), data


def test_imbalance_advice_names_the_config_keys_and_shows_recall_beside_the_count():
    from cnnlab.analysis.diagnose import diagnose
    from cnnlab.report import sections as S

    summ, data = _imbalanced_run()
    found = [f for f in diagnose(None, summ, data_info=data) if f.kind == "imbalance"]
    assert len(found) == 1 and found[0].severity == "warning"
    f = found[0]
    owl = next(r for r in summ["per_class"] if r["name"] == "owl")
    assert "'owl' 60 images" in f.text and f"recall {100 * owl['recall']:.1f}%" in f.text and "50x" in f.text
    assert "train.class_weights=balanced" in f.next and "data.sampler=balanced" in f.next
    # a run that already used them is told so, not told to try them
    used = diagnose(None, summ, data_info=data, config={"train": {"class_weights": "balanced"}})
    f2 = next(x for x in used if x.kind == "imbalance")
    assert "already used train.class_weights=balanced" in f2.next and f2.severity == "info"
    # balanced training classes: no finding
    even = {"counts": {"train": {"cat": 100, "dog": 90, "owl": 80}}}
    assert not [x for x in diagnose(None, summ, data_info=even) if x.kind == "imbalance"]
    # the report's per-class table: the training count beside each class's recall, and the keys in its note
    ctx = {"run": {"summary": summ, "data": data}, "findings": found}
    per = S._classes(ctx).blocks[1]
    assert per.head[:2] == ["class", "train images"] and "recall" in per.head
    row = next(r for r in per.rows if r[0] == "owl" or getattr(r[0], "text", None) == "owl")
    assert row[1] == "60" and abs(row[per.head.index("recall")].value - owl["recall"]) < 1e-12
    assert "train.class_weights=balanced" in per.note[0]
