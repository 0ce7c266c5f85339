"""Batches for training and evaluation, with whole-batch tensor augmentation.

Both paths yield uint8 (B, C, H, W) batches in the same seeded order; augmentation and
normalisation then run on the whole batch, on the training device, through `augment_batch` and
`normalize`. So the in-memory path and the DataLoader (stream) path share one definition of every
augmentation, by construction rather than by keeping two implementations in step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from cnnlab.config import AugmentConfig, ConfigError
from cnnlab.data.augment import apply_drawn, draw_policies, has_policies
from cnnlab.data.base import DataFileError, ImageSet, decode


def epoch_order(n: int, seed: int, epoch: int, *, balance=None) -> torch.Tensor:
    """The sample order of one epoch, a function of (seed, epoch) only, so a run resumed mid-epoch, or split
    across ranks (each takes its slice of every global batch of this one list), sees exactly the same order.
    Both data paths (in memory and DataLoader) take their batches from it.

    Default: a permutation. `balance` (the training labels, `data.sampler: balanced`): n draws with
    replacement, each image weighted 1 / its class's count, so every class is equally likely per draw."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if balance is None:
        return torch.randperm(n, generator=g)
    y = torch.as_tensor(balance, dtype=torch.int64)
    w = (1.0 / torch.bincount(y).double())[y]
    return torch.multinomial(w, n, replacement=True, generator=g)


def alternate_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """airbench's alternating flip (`data.augment.hflip: alternate`): whether each of the n training images is
    mirrored in `epoch` (0-based), bool (n,). Each image is mirrored at random once (seeded, the same draw
    every epoch) and every image is mirrored again on odd epochs, so an image alternates between its two
    views: a function of (seed, epoch, index) only, exact under resume and on any number of ranks."""
    once = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_019 + 1)) < 0.5
    return once ^ bool(epoch % 2)


_PAD_MODES = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}  # torchvision's names -> F.pad's


def check_augment(aug: AugmentConfig, h: int, w: int, *, in_memory: bool = True) -> None:
    """Settings that only the data can rule out (the image size; whether the images are in memory):
    experiment.run checks them once the data is known, before the run folder exists (not per batch)."""
    if aug.per_epoch and not in_memory:
        raise ConfigError("data.augment.per_epoch=true augments the whole training set in memory, but this data "
                          "streams from its files (data.loader: stream, or too large for the memory budget); "
                          "set data.loader=memory or data.augment.per_epoch=false")
    if aug.crop_padding and aug.crop_padding_mode == "reflect" and aug.crop_padding >= min(h, w):
        raise ConfigError(f"data.augment.crop_padding={aug.crop_padding}: reflect padding must be smaller than "
                          f"the {h}x{w} images; use a smaller padding or crop_padding_mode 'edge'")


def device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from `gen`'s seed, for the flip / translate / cutout draws: on a GPU they
    are then made where the images are (no host-to-device copy per step); on the CPU it is `gen` itself, so
    CPU results are those of drawing everything from `gen`. Either way a function of (seed, step) only."""
    device = torch.device(device)
    if device.type == "cpu":
        return gen
    return torch.Generator(device=device).manual_seed(gen.initial_seed())


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's whole-set augmentation (`data.augment.per_epoch`), apart from every step's."""
    return 10**12 + seed * 1_000_003 + epoch


def augment_epoch(images: torch.Tensor, aug: AugmentConfig, *, seed: int, flips: torch.Tensor | None = None,
                  chunk: int = 4096) -> torch.Tensor:
    """`data.augment.per_epoch`: the whole training set (uint8 (N, C, H, W), on its device) augmented at once at
    the start of an epoch, as airbench does, each image with its own draws: exactly `augment_batch` on all N
    images as one batch (draws from a generator seeded with `seed`), applied in chunks of `chunk` images to
    bound the memory of the gather. `flips`: the epoch's `alternate_flips` (hflip: alternate)."""
    if images is None:
        raise ValueError("data.augment.per_epoch needs the training images in memory (data.loader: memory)")
    n = len(images)
    out = torch.empty_like(images)
    for o in range(0, n, chunk):
        gen = torch.Generator().manual_seed(seed)  # the same draws for every chunk: each takes its rows
        out[o:o + chunk] = augment_batch(images[o:o + chunk], aug, gen, offset=o, total=n,
                                         device_gen=device_generator(gen, images.device),
                                         flip=flips[o:o + chunk] if flips is not None else None)
    return out


def augment_batch(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator, *, offset: int = 0,
                  total: int | None = None, flip: torch.Tensor | None = None,
                  device_gen: torch.Generator | None = None) -> torch.Tensor:
    """Random flip / pad-and-crop / cutout of a uint8 (B, C, H, W) batch, one draw per image, and between
    crop and cutout the torchvision v2 policies of data/augment.py (resized crop, rotation, RandAugment |
    TrivialAugment | AutoAugment, colour jitter, random erasing), also one draw per image.

    Semantics match torchvision's RandomHorizontalFlip(0.5) and RandomCrop(size, padding=p,
    padding_mode=aug.crop_padding_mode) (constant = zeros, edge, reflect), and Cutout (DeVries &
    Taylor 2017) with the square's centre uniform over the image.
    Random numbers come from `gen` on the CPU, or for the flip, translate and cutout from `device_gen` (a
    generator on the images' device seeded as `gen`, `device_generator`) when given. When `x` is
    rows offset..offset+B of a global batch of `total` images (one rank's slice under DDP), the draws
    are made for the whole global batch and this slice's rows are used: each image is augmented as
    it would be in a 1-process run. With `hflip: alternate` the flips are not drawn: `flip` (bool (B,), the
    batch's rows of `alternate_flips`) says which images are mirrored.

    Reflect padding (`crop_padding_mode: reflect`) here, on the uint8 images, gives exactly what airbench's
    reflect padding after normalisation gives: every padded pixel is a copy of an image pixel, and the
    normalisation is the same per-channel map for both.
    """
    return apply_augment(x, aug, draw_augment(aug, gen, tuple(x.shape), offset=offset, total=total, flip=flip,
                                              device_gen=device_gen))


@dataclass
class AugmentDraws:
    """Every random draw `augment_batch` makes for one batch (this slice's rows); applying them
    (`apply_augment`) uses no random numbers, so it can run on another thread (training/feed.py)."""
    flip: torch.Tensor | None  # bool (B,): mirrored
    shift: tuple[torch.Tensor, torch.Tensor] | None  # (dy, dx) of pad-and-crop, (B,) each
    cutout: tuple[torch.Tensor, torch.Tensor] | None  # (cy, cx), the squares' centres
    policies: list  # data/augment.py's draws, [(transform, per-image draws), ...]


def draw_augment(aug: AugmentConfig, gen: torch.Generator, shape: tuple[int, int, int, int], *, offset: int = 0,
                 total: int | None = None, flip: torch.Tensor | None = None,
                 device_gen: torch.Generator | None = None) -> AugmentDraws:
    """The draws of `augment_batch` for a batch of `shape` (B, C, H, W), in their fixed order: flip, crop,
    cutout (from `device_gen` when given, else `gen`), then the policies' per-image seeds (from `gen`) and
    draws."""
    b, c, h, w = shape
    total = b if total is None else total
    mine = slice(offset, offset + b)  # this slice's rows of the global batch's draws
    g = device_gen if device_gen is not None else gen
    on = dict(generator=g, device=g.device)
    if aug.hflip == "alternate":
        if flip is None:
            raise ValueError("data.augment.hflip=alternate: augment_batch needs the batch's flips (alternate_flips)")
    elif aug.hflip:
        flip = (torch.rand(total, **on) < 0.5)[mine]
    else:
        flip = None
    p = aug.crop_padding
    shift = None
    if p:
        shift = (torch.randint(0, 2 * p + 1, (total,), **on)[mine], torch.randint(0, 2 * p + 1, (total,), **on)[mine])
    cut = None
    if aug.cutout:
        cut = (torch.randint(0, h, (total,), **on)[mine], torch.randint(0, w, (total,), **on)[mine])
    policies = draw_policies(aug, (c, h, w), gen, mine=mine, total=total) if has_policies(aug) else []
    return AugmentDraws(flip, shift, cut, policies)


def apply_augment(x: torch.Tensor, aug: AugmentConfig, d: AugmentDraws) -> torch.Tensor:
    """`draw_augment`'s draws applied to uint8 (B, C, H, W) `x`, on its device: flip, pad-and-crop, the
    torchvision v2 policies, cutout. No random numbers are used."""
    b, c, h, w = x.shape
    dev = x.device
    if d.flip is not None:
        x = torch.where(d.flip.to(dev, non_blocking=True).view(b, 1, 1, 1), x.flip(3), x)
    if d.shift is not None:
        p = aug.crop_padding
        dy, dx = (t.to(dev, non_blocking=True) for t in d.shift)
        padded = torch.nn.functional.pad(x, (p, p, p, p), mode=_PAD_MODES[aug.crop_padding_mode])
        rows = (dy.view(b, 1) + torch.arange(h, device=dev)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=dev)).view(b, 1, 1, w)
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        ci = torch.arange(c, device=dev).view(1, c, 1, 1)
        x = padded[bi, ci, rows, cols]  # (B, C, H, W)
    if d.policies:  # torchvision v2 policies, one draw per image (data/augment.py)
        x = apply_drawn(x, d.policies)
    if d.cutout is not None:
        s = aug.cutout
        cy, cx = (t.to(dev, non_blocking=True).view(b, 1, 1) for t in d.cutout)
        yy = torch.arange(h, device=dev).view(1, h, 1)
        xx = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((yy >= cy - s // 2) & (yy < cy - s // 2 + s) & (xx >= cx - s // 2) & (xx < cx - s // 2 + s))
        x = x.masked_fill(inside.unsqueeze(1), 0)
    return x


class Normalizer:
    """uint8 (B, C, H, W) -> float (x / 255 - mean) / std, on the batch's device and memory format."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class _FileDataset(Dataset):
    def __init__(self, s: ImageSet, channels: int, size: int | None):
        self.s, self.channels, self.size = s, channels, size

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int):
        try:
            return decode(self.s.files[i], self.channels, self.size, *self.s.resize), int(self.s.labels[i]), i
        except Exception as e:  # sent back as a value: raised in a worker, it would arrive as the worker's traceback
            return _Failed(str(e) if self.s.files[i] in str(e) else f"{self.s.files[i]}: {e}")


class _Failed(str):
    """A file a DataLoader worker could not decode: the message, naming the file."""


def _collate(items: list):
    failed = next((x for x in items if isinstance(x, _Failed)), None)
    return failed if failed is not None else default_collate(items)


class Batches:
    """Yields (images uint8 (B,C,H,W), labels int64 (B,), index int64 (B,)) for one epoch.

    `order` is the epoch's sample order (all ranks), `rank`/`world` shard it: a training batch of the
    global size B is split so that rank r takes its slice of every global batch, which makes a
    W-process run step for step the same as a 1-process run with the same global batch.
    Evaluation passes each rank's contiguous, unpadded block (`eval_indices`) with `shard=False`:
    every sample is evaluated exactly once, whatever the set's size.
    """

    def __init__(self, s: ImageSet, *, batch_size: int, device: torch.device, channels: int, size: int,
                 num_workers: int = 0, rank: int = 0, world: int = 1, drop_last: bool = False):
        self.s, self.bs, self.device = s, batch_size, device
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.channels, self.size, self.num_workers = channels, size, num_workers
        self.images = s.images.to(device) if s.images is not None else None
        self.labels = torch.as_tensor(s.labels, dtype=torch.int64)
        self.labels_dev = self.labels.to(device)

    def num_batches(self, n: int | None = None) -> int:
        """Batches in an epoch over `n` samples (default: the whole set)."""
        n = len(self.s) if n is None else n
        return n // self.bs if self.drop_last and n >= self.bs else math.ceil(n / self.bs)

    def __len__(self) -> int:
        return self.num_batches()

    def global_size(self, i: int, n: int | None = None) -> int:
        """Samples in global batch `i` (all ranks together) of an epoch over `n` samples."""
        n = len(self.s) if n is None else n
        return max(0, min(self.bs, n - i * self.bs))

    def local_offset(self, i: int, n: int | None = None) -> int:
        """Where this rank's slice starts in global batch `i`."""
        return self.rank * math.ceil(self.global_size(i, n) / self.world)

    def _local(self, gidx: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return gidx
        per = math.ceil(len(gidx) / self.world)
        return gidx[self.rank * per:(self.rank + 1) * per]

    def iterate(self, order: torch.Tensor, start_batch: int = 0, *, shard: bool = True,
                images: torch.Tensor | None = None):
        """Batches of `order` from batch `start_batch` on; with `shard`, this rank's slice of each
        global batch (training), without it every index of `order` (evaluation blocks). `images`: take the
        pixels from this tensor (the set's images augmented for the epoch, `augment_epoch`) instead.

        In memory the order is copied to the device once and every batch is indexed there (the index
        yielded is on the device); no per-batch host-to-device copy of indices, nothing waits for the GPU."""
        nb = self.num_batches(len(order))
        source = images if images is not None else self.images
        if source is not None:
            order = order.to(self.device, non_blocking=True)
        batches = [order[i * self.bs:(i + 1) * self.bs] for i in range(start_batch, nb)]
        local = [self._local(b) for b in batches] if shard else batches
        if source is not None:
            for idx in local:
                yield source[idx], self.labels_dev[idx], idx
            return
        # stream path: decode in DataLoader workers, batches in exactly the same order
        ds = _FileDataset(self.s, self.channels, self.size)
        dl = DataLoader(ds, batch_sampler=[b.tolist() for b in local], num_workers=self.num_workers,
                        persistent_workers=False, pin_memory=self.device.type == "cuda", collate_fn=_collate)
        for batch in dl:
            if isinstance(batch, _Failed):
                raise DataFileError(str(batch))
            x, y, idx = batch
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx


def eval_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of range(n): blocks differ in size by at most one, none is padded."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return torch.arange(start, start + per + (1 if rank < extra else 0))

