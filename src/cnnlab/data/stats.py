"""The data facts of a split, each defined once: its channels (grey or colour), per-channel mean/std,
class counts, image sizes and modes, in one streaming pass.

Pixel sums are kept as exact integers (sum of x and of x*x over uint8 values), so the std has no
cancellation error however many pixels there are; files are decoded in a process (or thread) pool.
`cnnlab data stats` shows them (`compute_stats`); the training pipeline normalises with the same
numbers rounded to 6 decimals (`channel_stats`, `training_stats`).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from cnnlab.data import base
from cnnlab.data.base import ImageSet

GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F", "1")  # decoded as one channel by default


@dataclass
class Stats:
    mean: tuple[float, ...]  # per channel, pixel values scaled to [0, 1]
    std: tuple[float, ...]  # population std over every pixel of the split
    channels: int
    n_images: int
    n_pixels: int  # per channel
    class_counts: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> images
    modes: dict[str, int]  # Pillow mode as stored -> images
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def fmt(v):
            return "(" + ", ".join(f"{x:.4f}" for x in v) + ")"

        def top(counts, limit=8):
            more = f", ... ({len(counts)} in all)" if len(counts) > limit else ""
            return ", ".join(f"{k} {v}" for k, v in Counter(counts).most_common(limit)) + more

        lines = [f"images   {self.n_images:,}  ({self.n_pixels:,} pixels per channel, {self.seconds:.1f} s)",
                 f"mean     {fmt(self.mean)}", f"std      {fmt(self.std)}",
                 f"classes  {len(self.class_counts)}: {top(self.class_counts, 20)}",
                 f"sizes    {top(self.sizes)}", f"modes    {top(self.modes)}"]
        if self.unreadable:
            lines.append(f"skipped  {len(self.unreadable)} unreadable files, e.g. {self.unreadable[0]} "
                         "(run `cnnlab data check` for details)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# A process pool that is safe with zip members (each worker reopens the archive)


def _init_worker() -> None:
    base._open_zip.cache_clear()  # a forked zip handle shares its file offset with the parent


def pool_map(fn: Callable, chunks: list, jobs: int | None, *, threads: bool = False) -> Iterator:
    """`map(fn, chunks)` in `jobs` processes (inline for one job or one chunk), results in order.

    Workers are forked (cheap, no re-import) and use only Pillow and numpy, never torch ops. `threads`:
    a thread pool instead (Pillow decodes without the GIL), for callers that must not fork, such as a
    training process that may hold a process group or CUDA.
    """
    jobs = jobs or os.cpu_count() or 1
    if jobs <= 1 or len(chunks) <= 1:
        yield from map(fn, chunks)
        return
    if threads:
        ex = ThreadPoolExecutor(max_workers=min(jobs, len(chunks)))
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        ex = ProcessPoolExecutor(max_workers=min(jobs, len(chunks)), mp_context=ctx, initializer=_init_worker)
    try:
        yield from ex.map(fn, chunks)
    finally:  # on an error or an early stop, drop the chunks not started yet
        ex.shutdown(wait=True, cancel_futures=True)


def chunked(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def channels_of(refs: Iterable[str]) -> int:
    """1 when the first readable file is grey (any of GREY_MODES, 16-bit ones included), else 3."""
    for ref in refs:
        try:
            return 1 if base.open_image(ref).mode in GREY_MODES else 3
        except Exception:
            continue
    return 3


def split_channels(s: ImageSet) -> int:
    """The channels a split decodes to unless data.channels says otherwise: its tensor's, or its files'
    (`channels_of` the first 20)."""
    return int(s.images.shape[1]) if s.in_memory else channels_of(s.files[:20])


# ----------------------------------------------------------------------------------------------
# Partial sums


@dataclass
class _Partial:
    s: np.ndarray  # (C,) int64 sum of values
    ss: np.ndarray  # (C,) int64 sum of squared values
    n: int = 0  # pixels per channel
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    unreadable: list = field(default_factory=list)

    def add(self, other: "_Partial") -> None:
        self.s += other.s
        self.ss += other.ss
        self.n += other.n
        self.sizes.update(other.sizes)
        self.modes.update(other.modes)
        self.unreadable += other.unreadable


def _sum_batch(p: _Partial, x: np.ndarray) -> None:
    """Add a (B, H, W, C) or (B, C, H, W)-as-(B, C, HW) uint8 batch; `x` is (..., C) uint8."""
    flat = x.reshape(-1, x.shape[-1])
    p.s += flat.sum(0, dtype=np.int64)
    sq = flat.astype(np.uint16)
    np.multiply(sq, sq, out=sq)  # 255 * 255 fits in uint16
    p.ss += sq.sum(0, dtype=np.int64)
    p.n += flat.shape[0]


def _files_partial(args: tuple) -> _Partial:
    refs, channels, size, (resize, resize_size) = args
    p = _Partial(np.zeros(channels, np.int64), np.zeros(channels, np.int64))
    by_shape: dict[tuple, list] = {}
    for ref in refs:
        try:
            img = base.open_image(ref)
            p.modes[img.mode] += 1
            p.sizes[f"{img.size[0]}x{img.size[1]}"] += 1
            img = base.to_mode(img, channels)
            if size is not None:
                img = base.fit(img, size, resize, resize_size)  # as base.decode does
        except Exception as e:  # reported, not fatal: `cnnlab data check` says why
            p.unreadable.append(f"{ref} ({type(e).__name__}: {e})")
            continue
        arr = np.asarray(img, dtype=np.uint8)
        by_shape.setdefault(arr.shape, []).append(arr.reshape(arr.shape[0], arr.shape[1], channels))
    for arrs in by_shape.values():
        _sum_batch(p, np.stack(arrs))
    return p


def _tensor_partial(images: torch.Tensor, chunk: int = 4096) -> _Partial:
    c = images.shape[1]
    p = _Partial(np.zeros(c, np.int64), np.zeros(c, np.int64))
    for i in range(0, len(images), chunk):
        _sum_batch(p, images[i:i + chunk].permute(0, 2, 3, 1).numpy())  # (B, H, W, C)
    n, _, h, w = images.shape
    p.sizes[f"{w}x{h}"] = n
    p.modes["L" if c == 1 else "RGB" if c == 3 else f"{c}ch"] = n
    return p


def _finish(s: np.ndarray, ss: np.ndarray, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std in [0, 1] units from exact integer sums: var = (n*ss - s*s) / n^2 / 255^2."""
    if n == 0:
        raise ValueError("no pixels to compute statistics on (every file was unreadable, or the split is empty)")
    mean = tuple(int(a) / n / 255.0 for a in s)
    std = tuple(math.sqrt(max(0, n * int(b) - int(a) * int(a))) / n / 255.0 for a, b in zip(s, ss))
    return mean, std


def _sums(images: ImageSet, channels: int | None, size: int | None, jobs: int | None, chunk: int,
          threads: bool = False) -> _Partial:
    """Exact pixel sums of a split: its tensor as it is, or its files converted to `channels` and resized
    to `size` as the training pipeline decodes them."""
    if images.in_memory:
        x = images.images
        if channels is not None and channels != x.shape[1]:
            raise ValueError(f"compute_stats: images have {x.shape[1]} channels; converting to {channels} "
                             "is done by the training pipeline, not here")
        if size is not None and tuple(x.shape[2:]) != (size, size):
            raise ValueError("compute_stats: resizing in-memory images is done by the training pipeline")
        return _tensor_partial(x)
    channels = channels or split_channels(images)
    p = _Partial(np.zeros(channels, np.int64), np.zeros(channels, np.int64))
    work = [(c, channels, size, images.resize) for c in chunked(images.files, chunk)]
    for part in pool_map(_files_partial, work, jobs, threads=threads):
        p.add(part)
    return p


def compute_stats(images: ImageSet, *, channels: int | None = None, size: int | None = None,
                  jobs: int | None = None, chunk: int = 1000) -> Stats:
    """Statistics of one split (normally the training split) over every pixel of every image.

    `channels` (1 or 3) defaults to the data's own (grey files -> 1); `size` resizes as
    data.image_size would; files are decoded by `jobs` processes (default: every core).
    """
    t0 = time.perf_counter()
    p = _sums(images, channels, size, jobs, chunk)
    mean, std = _finish(p.s, p.ss, p.n)
    counts = np.bincount(images.labels[images.labels >= 0], minlength=len(images.classes))
    class_counts = {c: int(k) for c, k in zip(images.classes, counts)}
    return Stats(mean=mean, std=std, channels=len(mean), n_images=len(images) - len(p.unreadable), n_pixels=p.n,
                 class_counts=class_counts, sizes=dict(p.sizes.most_common()), modes=dict(p.modes.most_common()),
                 unreadable=p.unreadable, seconds=time.perf_counter() - t0)


def _rounded(mean_std: tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(tuple(round(float(v), 6) for v in vs) for vs in mean_std)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) over every pixel, in [0, 1] units, rounded to
    6 decimals as the training pipeline normalises with them (and data.json records them)."""
    p = _tensor_partial(images, chunk)
    return _rounded(_finish(p.s, p.ss, p.n))


def training_stats(s: ImageSet, channels: int, size: int | None, *, jobs: int | None = None,
                   chunk: int = 1000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`channel_stats` of a split, decoding its files (to `channels`, resized to `size`) when they are not
    in memory, in threads; a file that cannot be decoded is an error naming it."""
    if s.in_memory:
        return channel_stats(s.images)
    p = _sums(s, channels, size, jobs or min(8, (os.cpu_count() or 2) * 2), chunk, threads=True)
    if p.unreadable:
        raise ValueError(f"cannot decode {p.unreadable[0]} while computing the training split's mean/std"
                         + (f" (and {len(p.unreadable) - 1} more files)" if len(p.unreadable) > 1 else "")
                         + "; `cnnlab data check` lists every problem")
    return _rounded(_finish(p.s, p.ss, p.n))
