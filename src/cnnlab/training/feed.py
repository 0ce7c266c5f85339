"""The training micro-batches of one epoch, augmented and normalised, optionally one batch ahead in a thread.

`micro_batches` yields each micro-batch with its place in the optimizer step (`train.accumulate`) and the
step's generator. Augmentation is split in two (data/loader.py `draw_augment` / `apply_augment`): every
random draw is made here, on the calling (training) thread and in the synchronous order, so the draws are
a function of (seed, step, image) only and the global generator the model's own randomness (dropout)
uses is left as it was; the application uses no random numbers. With `data.prefetch` on (auto: when a
torchvision policy is set, the only augmentation costing real time) the application and normalisation
of batch i+1 run in a background thread while the model trains on batch i (PyTorch's ops release the
GIL), giving bit for bit the batches of the synchronous path. The thread is joined when the epoch ends,
stops early or fails; each DDP rank has its own. It runs its ops with the process's intra-op thread count
(`train.threads`), like the training thread: limited to one thread (torch.set_num_threads(1) in it) the
training ran 4x slower in benchmarks/throughput.py --policy on the 2-core machine, about as slow as
without the thread, which fits libgomp's spin-waiting (its idle workers spin unless it runs more threads
than cores, which a second team of threads brings about); README, Speed.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator

import torch

from cnnlab import dist
from cnnlab.config import Config
from cnnlab.data.augment import has_policies
from cnnlab.data.loader import (Batches, alternate_flips, apply_augment, augment_epoch, device_generator, draw_augment,
                                epoch_seed)


@dataclass
class MicroBatch:
    i: int  # its global batch in the epoch
    first: int  # the optimizer step's micro-batches: global batches first..last
    last: int
    step: int  # the 1-based optimizer step it belongs to
    sizes: list[int]  # the global sizes of the step's micro-batches
    x: torch.Tensor  # (B, C, H, W), augmented and normalised
    y: torch.Tensor  # (B,) labels
    idx: torch.Tensor  # (B,) sample indices
    gen: torch.Generator  # the step's generator after the augmentation draws (MixUp / CutMix draw next)


def prefetching(cfg: Config) -> bool:
    """`data.prefetch` resolved: on / off as set; auto = on when a torchvision policy is set (and the batches
    are augmented one by one, not `data.augment.per_epoch`)."""
    choice, aug = cfg.data.prefetch, cfg.data.augment
    return choice == "on" or (choice == "auto" and has_policies(aug) and not aug.per_epoch)


def micro_batches(batches: Batches, order: torch.Tensor, *, cfg: Config, normalize, epoch: int, start_batch: int,
                  step: int, limit: int, prefetch: bool | None = None) -> Iterator[MicroBatch]:
    """The micro-batches of `order` from global batch `start_batch` (the start of an optimizer step) up to
    `limit`, `step` optimizer steps having been taken before it. Augmentation depends only on (seed, step)
    and the image's place among the step's images (all ranks, all micro-batches)."""
    t, aug = cfg.train, cfg.data.augment
    per, n_order, dev = t.accumulate, len(order), batches.device
    first0 = start_batch - start_batch % per
    world = batches.world if dist.active() else 1
    flips = alternate_flips(len(batches.s), t.seed, epoch).to(dev) if aug.hflip == "alternate" else None
    images = None
    if aug.per_epoch:  # the whole epoch's augmentation at once (a function of seed and epoch), none per batch
        images = augment_epoch(batches.images, aug, seed=epoch_seed(t.seed, epoch), flips=flips)

    def drawn(items):  # on the training thread: every random draw, in the synchronous order
        for i, (x, y, idx) in enumerate(items, start_batch):
            first = i - i % per
            last = min(first + per, limit) - 1
            sizes = [batches.global_size(b, n_order) for b in range(first, last + 1)]
            s = step + 1 + (first - first0) // per
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + s)
            d = None
            if not aug.per_epoch:
                offset = sum(sizes[:i - first]) + (batches.local_offset(i, n_order) if world > 1 else 0)
                d = draw_augment(aug, gen, tuple(x.shape), offset=offset, total=sum(sizes),
                                 device_gen=device_generator(gen, dev),
                                 flip=flips[idx.to(dev, non_blocking=True)] if flips is not None else None)
            yield MicroBatch(i, first, last, s, sizes, x, y, idx, gen), d

    def applied(item) -> MicroBatch:  # no random numbers: on either thread
        mb, d = item
        mb.x = normalize(apply_augment(mb.x, aug, d) if d is not None else mb.x)  # (B, C, H, W)
        return mb

    items = islice(batches.iterate(order, start_batch=start_batch, images=images), max(0, limit - start_batch))
    if not (prefetching(cfg) if prefetch is None else prefetch):
        yield from map(applied, drawn(items))
        return
    yield from one_ahead(applied, drawn(items), device=dev)


def one_ahead(work: Callable, items: Iterable, *, device: torch.device | None = None) -> Iterator:
    """`map(work, items)` with `work` on item k+1 running in a background thread while the caller handles
    result k; `items` is advanced on the calling thread. The thread is joined when the results end, when
    the caller stops early (closing this generator) or when `work` raises (the error comes out here).
    On a GPU the thread takes `device` (or the calling thread's current device) as its own current device."""
    init = None
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index  # the calling thread's

        def init():
            torch.cuda.set_device(index)

    pool = ThreadPoolExecutor(1, thread_name_prefix="cnnlab-feed", initializer=init)
    try:
        pending: Future | None = None
        for item in items:
            nxt = pool.submit(work, item)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()
    finally:  # a batch not started is dropped, one running is waited for (at most one batch's work)
        pool.shutdown(wait=True, cancel_futures=True)
