"""One batch ahead (training/feed.py): the prefetched micro-batches are the synchronous ones bit for bit (also
from mid-epoch, and while the consumer draws from the global generator between batches as dropout does); a
whole training run with dropout ends with the same weights either way; the background thread is gone when
an epoch ends, is stopped early, fails in the thread, or is interrupted. (Under torchrun: tests/test_distributed.py trains its 2-process run with data.prefetch=on.)"""
from __future__ import annotations

import csv
import os
import signal
import threading

import pytest
import torch
import yaml
from torch import nn

from cnnlab import cli
from cnnlab import config as C
from cnnlab.data import loader
from cnnlab.data.augment import mix_batch
from cnnlab.data.base import ImageSet
from cnnlab.training import checkpoint as ckpt
from cnnlab.models import MODELS
from cnnlab.training import feed

N, K, S, BS = 40, 4, 16, 8
AUG = ["data.augment.hflip=true", "data.augment.crop_padding=2", "data.augment.cutout=4",
       "data.augment.randaugment.num_ops=2", "data.augment.rotation=10", "data.augment.random_erasing=0.5",
       "data.augment.mixup=0.2"]


@pytest.fixture(scope="module")
def images() -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 3, S, S), generator=g, dtype=torch.uint8)
    return ImageSet(labels=(torch.arange(N) % K).numpy(), classes=list("abcd"), images=x)


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cnnlab-feed")]


def _feed(s: ImageSet, cfg, prefetch: bool, start_batch: int = 0, step: int = 0):
    b = loader.Batches(s, batch_size=BS, device=torch.device("cpu"), channels=3, size=S)
    order = loader.epoch_order(N, 0, 0)
    norm = loader.Normalizer([0.5] * 3, [0.25] * 3, "cpu")
    return feed.micro_batches(b, order, cfg=cfg, normalize=norm, epoch=0, start_batch=start_batch, step=step,
                              limit=b.num_batches(), prefetch=prefetch)


def _epoch(s: ImageSet, cfg, prefetch: bool, start_batch: int = 0, step: int = 0) -> list:
    torch.manual_seed(1)
    out = []
    for mb in _feed(s, cfg, prefetch, start_batch, step):
        x, y = mix_batch(mb.x, mb.y, cfg.data.augment, mb.gen, K)
        dropout = torch.rand(5)  # the model's own draws from the global generator, between batches
        out.append((mb.i, mb.step, mb.sizes, mb.idx, x, y, dropout))
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(ra, rb)) for ra, rb in zip(a, b))


def test_the_prefetched_epoch_is_the_synchronous_one_bit_for_bit(images, monkeypatch):
    cfg = C.load(None, [*AUG, "train.accumulate=2"])
    assert feed.prefetching(cfg) and not feed.prefetching(C.load(None, ["data.augment.hflip=true"]))
    where = []
    apply = feed.apply_augment

    def spy(*a, **k):
        where.append(threading.current_thread().name)
        return apply(*a, **k)

    monkeypatch.setattr(feed, "apply_augment", spy)
    sync = _epoch(images, cfg, prefetch=False)
    assert where and all(w == threading.main_thread().name for w in where)
    where.clear()
    ahead = _epoch(images, cfg, prefetch=True)
    assert where and all(w.startswith("cnnlab-feed") for w in where)  # the work did run in the thread
    assert len(sync) == N // BS and [r[1] for r in sync] == [1, 1, 2, 2, 3]  # steps of 2 micro-batches
    assert _same(ahead, sync)
    plain = loader.Normalizer([0.5] * 3, [0.25] * 3, "cpu")(images.images[sync[0][3]])
    assert not torch.equal(sync[0][4], plain)  # augmentation did something
    # from mid-epoch (a resume after step 1): the rest of the same epoch
    rest = _epoch(images, cfg, prefetch=True, start_batch=2, step=1)
    assert _same([r[:-1] for r in rest], [r[:-1] for r in sync[2:]])  # (the stand-in dropout aside)
    assert _threads() == []


def test_the_thread_ends_when_the_consumer_stops_early_fails_or_is_interrupted(images, monkeypatch):
    cfg = C.load(None, AUG)
    it = _feed(images, cfg, prefetch=True)
    next(it), next(it)
    assert _threads()  # running (or idle, waiting for the next batch)
    it.close()  # early stop: the consumer leaves the loop
    assert _threads() == []
    for error in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(error):
            for k, _ in enumerate(_feed(images, cfg, prefetch=True)):
                if k == 2:
                    raise error("stop")
        assert _threads() == []
    calls = []
    apply = feed.apply_augment

    def failing(*a, **k):  # the work itself fails in the thread, on the fourth batch
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("planted failure in the augmentation thread")
        return apply(*a, **k)

    monkeypatch.setattr(feed, "apply_augment", failing)
    got = []
    with pytest.raises(ValueError, match="planted failure"):
        for mb in _feed(images, cfg, prefetch=True):
            got.append(mb.i)
    assert got == [0, 1, 2] and _threads() == []


FIRED: set[str] = set()


class Planted(nn.Module):
    """A small net with dropout (the model's own draws from the global generator); at its `at`-th training
    call it sends this process SIGTERM (training stops after that step, resumably) or gives NaN logits."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int, at: int, what: str):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Dropout(0.3), nn.Linear(6 * (input_size // 2) ** 2, num_classes))
        self.at, self.what, self.calls = at, what, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at and self.what == "nan":
                return out * float("nan")
            if self.calls == self.at and "sigterm" not in FIRED:  # once: not again in the resumed run
                FIRED.add("sigterm")
                os.kill(os.getpid(), signal.SIGTERM)
        return out


if "feed_planted" not in MODELS:
    @MODELS.register("feed_planted")
    def _feed_planted(*, num_classes: int, in_channels: int, input_size: int, at: int = 0, what: str = "sigterm"):
        return Planted(num_classes, in_channels, input_size, at, what)


def _train(folder, name: str, prefetch: str, *overrides) -> tuple[int, object]:
    cfg = {"data": {"name": "digits", "val_split": 0.2, "prefetch": prefetch,
                    "augment": {"hflip": True, "randaugment": {"num_ops": 2}, "random_erasing": 0.3, "mixup": 0.2}},
           "model": {"name": "feed_planted"}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
           "train": {"epochs": 2, "batch_size": 64, "limit_batches": 3, "seed": 4, "progress": "off", "threads": 1},
           "output": {"dir": str(folder), "name": name, "report": False}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    n = torch.get_num_threads()
    try:
        return cli.main(["train", str(path), *overrides]), folder / name
    finally:
        torch.set_num_threads(n)


def test_a_run_with_dropout_trains_the_same_weights_with_and_without_prefetch_and_resumes_exactly(tmp_path):
    """Synchronous, and prefetched but stopped by SIGTERM mid-epoch 1 then resumed: the same weights, global
    generator state and history bit for bit."""
    (rc1, off), (rc2, stopped) = _train(tmp_path, "off", "off"), _train(tmp_path, "on", "on", "model.options.at=2")
    assert (rc1, rc2) == (0, 143) and _threads() == []
    assert ckpt.load(stopped / "checkpoints/last.pt")["state"]["batch_in_epoch"] == 2
    assert cli.main(["train", "--resume", str(stopped)]) == 0
    ref = ckpt.load(off / "checkpoints/last.pt")
    assert ref["state"]["step"] == 6
    c = ckpt.load(stopped / "checkpoints/last.pt")
    assert all(torch.equal(c["model"][k], ref["model"][k]) for k in ref["model"])
    assert torch.equal(c["rng"]["torch"], ref["rng"]["torch"])  # dropout drew the same numbers
    assert _history(stopped) == _history(off)
    assert _threads() == []


def _history(run) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_a_run_that_fails_mid_epoch_leaves_no_thread(tmp_path, capsys):
    rc, _ = _train(tmp_path, "nan", "on", "model.options.at=2", "model.options.what=nan")
    assert rc == 1 and "at step 2" in capsys.readouterr().err
    assert _threads() == []
