"""Training throughput (images/s) of the CIFAR-10 four-conv net: cnnlab's data path vs the plain
PyTorch pipeline that course code uses, same model, batch size, optimizer, fp32, measured A B A B.

    python benchmarks/throughput.py [--batches 60] [--rounds 3] [--policy [--data-only]]
    python benchmarks/throughput.py --model fastnet [--widths 64 128 128] [--batches 20] [--rounds 3]

Plain pipeline: torchvision ImageFolder + Compose(RandomCrop(32, padding=4), RandomHorizontalFlip(),
ToTensor(), Normalize()) + DataLoader(batch 128, shuffle), the better of 0 and 2 workers.
cnnlab: the decoded uint8 cache resident in memory, whole-batch flip + pad-and-crop, the real
`training.train_one_epoch` step. Prints the ratio; absolute numbers on shared machines are noise.

--policy: the same with RandAugment (2 ops, magnitude 9) + MixUp (alpha 0.2) added on both sides. Plain:
v2.RandAugment in the per-image Compose (PIL, DataLoader workers), v2.MixUp on each batch, cross-entropy on
the soft targets. cnnlab: data.augment.randaugment + mixup (per-image draws, ops batched; data/augment.py),
the next batch augmented in a background thread while the model trains (data.prefetch auto, on here);
each round also times cnnlab with data.prefetch=off (augmenting between steps) for the thread's gain.

--model fastnet: the fast recipe (examples/cifar10-fast.yaml: airbench's net, batch 512, Nesterov SGD with
batch-norm parameters at 64x the rate, label smoothing, lookahead) at --widths. Plain: RandomCrop(32,
padding=2, reflect) + RandomHorizontalFlip + ToTensor + Normalize per image, DataLoader, the same model and
torch.optim.SGD. cnnlab: the recipe as it is (alternating flip, reflection padding, whitening bias frozen,
biases decayed per step) and, in the same rounds, the recipe before issue #16's details (flip drawn every
step, zero padding, the whitening bias trained, no bias decay), both timed in epoch 3 (the first epoch with
the bias frozen; an odd epoch, where alternating flip mirrors every image it did not mirror in epoch 2).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import ROOT, cifar_zip, extracted_cifar, machine

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def make_model():
    from cnnlab import config as C
    from cnnlab.models import build_model

    torch.manual_seed(0)
    return build_model(C.load(None, ["model.name=cifar_convnet"]).model, num_classes=10, in_channels=3, input_size=32)


FAST = ROOT / "examples" / "cifar10-fast.yaml"
# the fast recipe before issue #16's details: flip drawn every step, zero padding, the whitening bias trained
# throughout, batch-norm and whitening biases not decayed
FAST_BEFORE = ["data.augment.hflip=true", "data.augment.crop_padding_mode=constant", "model.options.whiten_bias_epochs=null",
               "optim.decay_bias_and_norm=false", "optim.decay_per_step=false"]


def fast_cfg(widths, batches: int, extra=(), batch: int | None = None):
    from cnnlab import config as C

    return C.load(str(FAST), [f"model.options.widths=[{','.join(map(str, widths))}]",
                              f"train.limit_batches={batches + 3}", *extra,
                              *([f"train.batch_size={batch}"] if batch else [])])


def make_fastnet(cfg, splits):
    """The fast net, seeded, its whitening stem fitted to the sample `cnnlab train` fits it to."""
    from cnnlab.data.loader import Normalizer
    from cnnlab.models import build_model, hooks
    from cnnlab.training import loop as T

    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3, input_size=32)
    hooks.init_from_data(model, Normalizer(splits.mean, splits.std, "cpu")(T._init_sample(splits, None, 0)))
    return model


POLICY = ["data.augment.randaugment.num_ops=2", "data.augment.randaugment.magnitude=9", "data.augment.mixup=0.2"]


def plain_loader(workers: int, batch: int, policy: bool = False, fast: bool = False):
    import torchvision
    import torchvision.transforms as T
    from torchvision.transforms import v2

    extra = [v2.RandAugment(num_ops=2, magnitude=9)] if policy else []
    crop = T.RandomCrop(32, padding=2, padding_mode="reflect") if fast else T.RandomCrop(32, padding=4)
    tf = T.Compose([crop, T.RandomHorizontalFlip(), *extra, T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = torchvision.datasets.ImageFolder(str(extracted_cifar()), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def time_plain(loader, batches: int, policy: bool = False, fast=None) -> float:
    """`fast` = (cfg, splits): the fast net with its recipe's SGD and label smoothing instead."""
    from torchvision.transforms import v2

    mix = v2.MixUp(alpha=0.2, num_classes=10) if policy else None
    smoothing = 0.0
    if fast is None:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        cfg, splits = fast
        model, o = make_fastnet(cfg, splits), cfg.optim
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=o.lr, momentum=o.momentum,
                              nesterov=o.nesterov, weight_decay=o.weight_decay)
        smoothing = cfg.train.label_smoothing
    model.train()
    it = iter(loader)
    n, t0 = 0, None
    for i in range(batches + 3):
        x, y = next(it)
        if i == 3:  # warm-up batches excluded
            t0, n = time.perf_counter(), 0
        if mix is not None:
            x, y = mix(x, y)  # soft (B, 10) targets
        loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t0)


def time_cnnlab(splits, batch: int, batches: int, policy: bool = False, prefetch: str = "auto") -> float:
    from cnnlab import config as C

    cfg = C.load(None, ["model.name=cifar_convnet", "data.augment.hflip=true", "data.augment.crop_padding=4",
                        f"train.batch_size={batch}", "optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9",
                        "train.epochs=1", f"train.limit_batches={batches + 3}", f"data.prefetch={prefetch}",
                        *(POLICY if policy else [])])
    return time_steps(splits, cfg, make_model(), batches)


def time_fast(splits, cfg, batches: int, epoch: int = 3) -> float:
    return time_steps(splits, cfg, make_fastnet(cfg, splits), batches, epoch)


def time_steps(splits, cfg, model, batches: int, epoch: int = 0) -> float:
    """img/s of `batches` of cnnlab's real training steps (`training.train_one_epoch`, after 3 warm-up steps)
    of `model` per `cfg`, in epoch `epoch` (the model's `before_epoch` hook called as `fit` does)."""
    from cnnlab import dist
    from cnnlab.data.loader import Batches, Normalizer, epoch_order
    from cnnlab.models import hooks
    from cnnlab.training import loop as T

    batch, dev = cfg.train.batch_size, torch.device("cpu")
    b = Batches(splits.train, batch_size=batch, device=dev, channels=3, size=32, drop_last=True)
    channels_last = T.use_channels_last(cfg, model, dev)  # as training.fit does
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm = Normalizer(splits.mean, splits.std, dev, channels_last)
    ts = T.TrainState.build(cfg, model, steps_per_epoch=batches + 3, device=dev)
    first = epoch * (batches + 3)  # steps before this epoch: lookahead runs from 30% of training on
    ts.progress.epoch, ts.progress.step = epoch, first
    hooks.before_epoch(model, epoch)
    marks = {}
    with dist.SignalGuard() as guard:
        for step, *_ in T.train_one_epoch(ts, model, b, epoch_order(len(splits.train), 0, epoch), normalize=norm,
                                            cfg=cfg, guard=guard):
            if step in (first + 3, first + batches + 3):
                marks[step] = time.perf_counter()
    return batches * batch / (marks[first + batches + 3] - marks[first + 3])


def time_data_only(splits, batch: int, batches: int) -> tuple[float, float]:
    """img/s of the two data paths alone, one thread each, no model: plain = the per-image Compose with
    RandAugment on decoded JPEGs + collate + v2.MixUp; cnnlab = augment_batch + normalise + mix_batch on
    the resident uint8 tensor."""
    from torchvision.transforms import v2

    from cnnlab import config as C
    from cnnlab.data.augment import mix_batch
    from cnnlab.data.loader import Normalizer, augment_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = plain_loader(0, batch, policy=True).dataset
        mix = v2.MixUp(alpha=0.2, num_classes=10)
        n = min(len(ds), len(splits.train))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:batch * batches].view(batches, batch)
        t0 = time.perf_counter()
        for b in idx:
            items = [ds[int(i)] for i in b]
            mix(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))
        plain = batch * batches / (time.perf_counter() - t0)
        aug = C.load(None, ["data.augment.hflip=true", "data.augment.crop_padding=4", *POLICY]).data.augment
        norm = Normalizer(splits.mean, splits.std, "cpu")
        t0 = time.perf_counter()
        for k, b in enumerate(idx):
            g = torch.Generator().manual_seed(k)
            x = norm(augment_batch(splits.train.images[b], aug, g))
            mix_batch(x, torch.as_tensor(splits.train.labels[b.numpy()]), aug, g, 10)
        ours = batch * batches / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return plain, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default 128; with --model fastnet the recipe's 512")
    ap.add_argument("--policy", action="store_true", help="add RandAugment + MixUp on both sides")
    ap.add_argument("--data-only", action="store_true", help="with --policy: only the data paths, no model")
    ap.add_argument("--model", choices=["convnet", "fastnet"], default="convnet",
                    help="fastnet: the fast recipe, now and before issue #16's details")
    ap.add_argument("--widths", type=int, nargs=3, default=[64, 128, 128], help="with --model fastnet")
    a = ap.parse_args()
    from cnnlab import config as C
    from cnnlab.data.pipeline import prepare

    print(f"machine: {machine()}")
    splits = prepare(C.load(None, ["data.name=folder", f"data.root={cifar_zip()}", "data.val_split=5000"]).data)
    extracted_cifar()
    if a.model == "fastnet":
        return main_fast(a, splits)
    a.batch = a.batch or 128
    if a.policy and a.data_only:
        dp, dc = time_data_only(splits, a.batch, max(4, a.batches // 4))
        print(f"data path alone (flip, pad-crop, RandAugment, MixUp; 1 thread, no model): plain {dp:.0f} img/s, "
              f"cnnlab {dc:.0f} img/s; ratio {dc / dp:.2f}x")
        return
    # pick the plain pipeline's better worker count
    plain = {w: plain_loader(w, a.batch, a.policy) for w in (0, 2)}
    first = {w: time_plain(plain[w], a.batches // 2, a.policy) for w in plain}
    w_best = max(first, key=first.get)
    print(f"plain pipeline, 0 workers: {first[0]:.0f} img/s, 2 workers: {first[2]:.0f} img/s -> using {w_best}")
    res = {"plain": [], "cnnlab": [], "no prefetch": []}
    for r in range(a.rounds):  # A B A B (with --policy: A B C A B C, C = cnnlab augmenting between steps)
        res["plain"].append(time_plain(plain[w_best], a.batches, a.policy))
        res["cnnlab"].append(time_cnnlab(splits, a.batch, a.batches, a.policy))
        line = f"round {r + 1}: plain {res['plain'][-1]:.0f} img/s, cnnlab {res['cnnlab'][-1]:.0f} img/s"
        if a.policy:
            res["no prefetch"].append(time_cnnlab(splits, a.batch, a.batches, a.policy, prefetch="off"))
            line += f", cnnlab with data.prefetch=off {res['no prefetch'][-1]:.0f} img/s"
        print(line, flush=True)
    p, c = statistics.median(res["plain"]), statistics.median(res["cnnlab"])
    print(f"median: plain {p:.0f} img/s, cnnlab {c:.0f} img/s; ratio cnnlab/plain = {c / p:.2f}x "
          f"(four-conv net, batch {a.batch}, SGD, fp32{', RandAugment + MixUp' if a.policy else ''})")
    if a.policy:
        off = statistics.median(res["no prefetch"])
        print(f"without the background augmentation thread (data.prefetch=off): cnnlab {off:.0f} img/s, "
              f"ratio cnnlab/plain = {off / p:.2f}x; the thread's gain {c / off:.2f}x")
    if a.policy:
        dp, dc = time_data_only(splits, a.batch, max(4, a.batches // 4))
        print(f"data path alone (flip, pad-crop, RandAugment, MixUp; 1 thread, no model): plain {dp:.0f} img/s, "
              f"cnnlab {dc:.0f} img/s; ratio {dc / dp:.2f}x")


def main_fast(a, splits) -> None:
    now, before = fast_cfg(a.widths, a.batches, batch=a.batch), fast_cfg(a.widths, a.batches, FAST_BEFORE, a.batch)
    batch = now.train.batch_size
    plain = {w: plain_loader(w, batch, fast=True) for w in (0, 2)}
    first = {w: time_plain(plain[w], max(2, a.batches // 2), fast=(now, splits)) for w in plain}
    w_best = max(first, key=first.get)
    print(f"plain pipeline, 0 workers: {first[0]:.0f} img/s, 2 workers: {first[2]:.0f} img/s -> using {w_best}")
    res = {"plain": [], "now": [], "before": []}
    for r in range(a.rounds):  # A B C A B C
        res["plain"].append(time_plain(plain[w_best], a.batches, fast=(now, splits)))
        res["now"].append(time_fast(splits, now, a.batches))
        res["before"].append(time_fast(splits, before, a.batches))
        print(f"round {r + 1}: plain {res['plain'][-1]:.0f} img/s, cnnlab fast recipe {res['now'][-1]:.0f} img/s, "
              f"the recipe before #16's details {res['before'][-1]:.0f} img/s", flush=True)
    p, c, b = (statistics.median(res[k]) for k in ("plain", "now", "before"))
    print(f"median: plain {p:.0f} img/s, cnnlab {c:.0f} img/s (before #16's details {b:.0f} img/s); ratio "
          f"cnnlab/plain = {c / p:.2f}x (before: {b / p:.2f}x); now/before {c / b:.2f}x "
          f"(fast net {'/'.join(map(str, a.widths))}, batch {batch}, fp32)")


if __name__ == "__main__":
    main()
