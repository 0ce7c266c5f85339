"""The GPU path on the CPU: an epoch's statistics kept on the device equal the old per-step host reads to the
bit, a non-finite loss found at a later read still names its own step and epoch, and the whole-set
per-epoch augmentation (`data.augment.per_epoch`) is the per-batch augmentation applied to the whole set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from cnnlab import cli
from cnnlab import config as C
from cnnlab.config import AugmentConfig
from cnnlab.data.augment import hard_targets, mix_batch
from cnnlab.data.loader import (Batches, Normalizer, augment_batch, augment_epoch, device_generator, epoch_order,
                                epoch_seed)
from cnnlab.data.pipeline import prepare
from cnnlab.training import loss as loss_mod
from cnnlab.training import loop as T
from cnnlab.training.state import NonFiniteLossError, TrainState
from planted import NanAt

CPU = torch.device("cpu")
TINY = {"data.name": "digits", "data.val_split": 0.15, "data.augment.hflip": True, "data.augment.crop_padding": 1,
        "model.name": "layers", "model.layers": [{"conv": {"out": 6, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                                 "flatten", {"linear": "classes"}],
        "optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9, "train.batch_size": 64, "train.seed": 3,
        "train.label_smoothing": 0.1, "train.class_weights": "balanced", "train.accumulate": 2,
        "train.progress": "off"}


class NoSignal:
    def code(self):
        return None


@pytest.fixture(scope="module")
def setup():
    cfg = C.load(None, TINY)
    return cfg, prepare(cfg.data)


def fresh(cfg, splits, model=None):
    torch.manual_seed(cfg.train.seed)
    model = model if model is not None else T.build_for(cfg, splits)
    b = Batches(splits.train, batch_size=cfg.train.batch_size, device=CPU, channels=splits.channels,
                size=splits.size, drop_last=True)
    ts = TrainState.build(cfg, model, steps_per_epoch=math.ceil(len(b) / cfg.train.accumulate), device=CPU)
    weights = loss_mod.class_weights(cfg, splits.train.labels, splits.classes)
    return ts, b, Normalizer(splits.mean, splits.std, CPU), weights


def old_epoch(cfg, ts, b, normalize, weights, order):
    """The loop as it was before the device-side sums: a host read (`.item()`) of every micro-batch."""
    t, per, bs, n = cfg.train, cfg.train.accumulate, b.bs, len(order)
    limit, steps = b.num_batches(n), []
    loss_sum, correct, seen, i = 0.0, 0, 0, 0
    ts.model.train()
    for x, y, idx in b.iterate(order):
        first, last = i - i % per, min(i - i % per + per, limit) - 1
        j, step = i - first, ts.progress.step + 1
        if j == 0:
            sizes = [b.global_size(k, n) for k in range(first, last + 1)]
            denom = loss_mod.total_weight(weights, b.labels[order[first * bs:first * bs + sum(sizes)]])
            sums = torch.zeros(3, dtype=torch.float64)
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
        x = normalize(augment_batch(x, cfg.data.augment, gen, offset=sum(sizes[:j]), total=sum(sizes)))
        x, y = mix_batch(x, y, cfg.data.augment, gen, len(b.s.classes))
        logits = ts.model(x)
        total = loss_mod.per_sample(logits.float(), y, weights, t.label_smoothing).sum()
        assert bool(torch.isfinite(total))
        ts.backward(total / denom, first=j == 0)
        sums += torch.tensor([total.item(), (logits.argmax(1) == hard_targets(y)).sum().item(), y.shape[0]],
                             dtype=torch.float64)
        i += 1
        if i <= last:
            continue
        ts.step(step)
        loss = sums[0].item() / denom
        loss_sum += loss * sums[2].item()
        correct += int(sums[1].item())
        seen += int(sums[2].item())
        ts.progress.step = step
        steps.append((step, loss, sums[1].item() / max(1.0, sums[2].item())))
    return loss_sum, correct, seen, steps


def new_epoch(cfg, ts, b, normalize, weights, order, read_at):
    return list(T.train_one_epoch(ts, ts.model, b, order, normalize=normalize, cfg=cfg, guard=NoSignal(),
                                  weights=weights, read_at=read_at))


def test_device_side_epoch_statistics_equal_the_per_step_host_reads(setup):
    cfg, splits = setup
    order = epoch_order(len(splits.train), cfg.train.seed, 0)
    ts_old, b, normalize, weights = fresh(cfg, splits)
    loss_sum, correct, seen, steps = old_epoch(cfg, ts_old, b, normalize, weights, order)
    assert len(steps) >= 10 and seen == len(b) * b.bs

    ts, b, normalize, weights = fresh(cfg, splits)  # read only at the epoch's end: nothing synchronises before
    out = new_epoch(cfg, ts, b, normalize, weights, order, read_at=lambda s: False)
    assert [s for s, _, _, _ in out] == [s for s, _, _ in steps]
    assert all(loss is None and acc is None for _, loss, acc, _ in out[:-1])  # no host read inside the epoch
    p = ts.progress
    assert (p.epoch_loss_sum, p.epoch_correct, p.epoch_seen) == (loss_sum, correct, seen)  # bit-identical
    assert out[-1][1:3] == steps[-1][1:]
    for (k, a), v in zip(ts_old.model.state_dict().items(), ts.model.state_dict().values()):
        assert torch.equal(a, v), k  # the same updates

    ts, b, normalize, weights = fresh(cfg, splits)  # read every step (lr-find's use): every step's values
    assert [(s, loss, acc) for s, loss, acc, _ in new_epoch(cfg, ts, b, normalize, weights, order, None)] == steps


def test_a_nan_at_step_k_of_epoch_e_read_later_is_reported_as_step_k_epoch_e(setup):
    cfg, splits = setup
    cfg = C.load(None, {**TINY, "train.accumulate": 1, "train.class_weights": "none"})
    per_epoch = Batches(splits.train, batch_size=64, device=CPU, channels=1, size=8, drop_last=True).num_batches()
    k = per_epoch + 5  # the 5th step of epoch 2
    ts, b, normalize, weights = fresh(cfg, splits, NanAt(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), at=k))
    seen = []
    for step, loss, _, _ in new_epoch(cfg, ts, b, normalize, weights, epoch_order(len(b.s), 3, 0), None):
        seen.append(step)
    ts.progress.epoch, ts.progress.batch_in_epoch = 1, 0
    read_every = 10
    with pytest.raises(NonFiniteLossError) as e:
        for step, loss, _, _ in T.train_one_epoch(ts, ts.model, b, epoch_order(len(b.s), 3, 1), normalize=normalize,
                                                  cfg=cfg, guard=NoSignal(), read_at=lambda s: s % read_every == 0):
            seen.append(step)
            assert (loss is None) == (step % read_every != 0 and step != 2 * per_epoch)
    msg = str(e.value)
    assert f"became nan at step {k} (epoch 2)" in msg and "Likely causes" in msg, msg
    first_read = (k // read_every + 1) * read_every
    assert f"training stopped at step {first_read}, its first check after it" in msg
    assert ts.progress.step == first_read > k  # found at the next read, after the steps in between
    assert max(s for s in seen) == first_read - 1  # the read step itself never yielded


def test_per_epoch_augmentation_is_the_batch_augmentation_of_the_whole_set_in_any_chunks():
    aug = AugmentConfig(hflip=True, crop_padding=2, crop_padding_mode="reflect", cutout=3, per_epoch=True)
    x = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    whole = augment_batch(x, aug, torch.Generator().manual_seed(epoch_seed(1, 4)))
    assert torch.equal(augment_epoch(x, aug, seed=epoch_seed(1, 4), chunk=10), whole)
    assert torch.equal(augment_epoch(x, aug, seed=epoch_seed(1, 4)), whole)
    assert not torch.equal(augment_epoch(x, aug, seed=epoch_seed(1, 5)), whole)  # a new draw every epoch
    gen = torch.Generator().manual_seed(9)
    assert device_generator(gen, CPU) is gen  # on the CPU the draws are the CPU generator's, as before


def run_cli(tmp_path, *overrides):
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "digits", "val_split": 0.15,
                                            "augment": {"hflip": "alternate", "crop_padding": 1}},
                                   "model": {"name": "layers", "layers": TINY["model.layers"]},
                                   "train": {"epochs": 2, "batch_size": 64, "progress": "off", "threads": 1},
                                   "output": {"report": False, "dir": str(tmp_path), "name": "tiny"}}))
    return cli.main(["train", str(cfg), *overrides])


def test_per_epoch_augmentation_trains_and_resumes_exactly_and_needs_data_in_memory(tmp_path, capsys):
    from cnnlab.training import checkpoint as ckpt

    assert run_cli(tmp_path / "a", "data.augment.per_epoch=true") == 0
    assert run_cli(tmp_path / "b", "data.augment.per_epoch=true", "train.epochs=1") == 0
    assert cli.main(["train", "--resume", str(tmp_path / "b" / "tiny"), "train.epochs=2"]) == 0
    wa, wb = (ckpt.load(tmp_path / d / "tiny" / "checkpoints" / "last.pt")["model"] for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # epoch 2's augmentation drawn again from (seed, epoch)
    assert run_cli(tmp_path / "c") == 0  # per-batch draws: other weights
    wc = ckpt.load(tmp_path / "c" / "tiny" / "checkpoints" / "last.pt")["model"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    capsys.readouterr()
    data = tmp_path / "pngs"
    for k in range(2):  # a few files read from disk batch by batch (the stream path)
        (data / f"c{k}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 60 * k + i, dtype=np.uint8)).save(data / f"c{k}" / f"{i}.png")
    assert run_cli(tmp_path / "d", "data.augment.per_epoch=true", "data.name=folder", f"data.root={data}",
                   "data.loader=stream", "data.val_split=2") == 2
    err = capsys.readouterr().err
    assert "data.augment.per_epoch" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "tiny").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the host synchronisations of a GPU)")
def test_on_a_gpu_the_synchronisations_of_an_epoch_do_not_grow_with_its_steps(setup):
    """torch's sync debug mode warns at every operation that makes the host wait for the GPU: an epoch
    of 8 steps must make no more of them than an epoch of 3 (the reads at its start and end only)."""
    import warnings

    _, splits = setup
    dev = torch.device("cuda")

    def syncs(steps: int) -> int:
        c = C.load(None, {**TINY, "train.accumulate": 1, "train.class_weights": "none",
                          "data.augment.hflip": "alternate", "data.augment.crop_padding_mode": "reflect",
                          "train.limit_batches": steps})
        torch.manual_seed(0)
        model = T.build_for(c, splits).to(dev)
        b = Batches(splits.train, batch_size=64, device=dev, channels=1, size=8, drop_last=True)
        ts = TrainState.build(c, model, steps_per_epoch=steps, device=dev)
        norm = Normalizer(splits.mean, splits.std, dev)
        order = epoch_order(len(splits.train), 0, 0)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = list(T.train_one_epoch(ts, model, b, order, normalize=norm, cfg=c, guard=NoSignal(),
                                             read_at=lambda s: False))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(out) == steps and out[-1][1] is not None
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(8) == syncs(3)
