"""From a DataConfig to ready splits: open the data set by name, carve val/test (seeded, stratified,
disjoint), decode, normalisation statistics.

`open_source` is the one way a data set is opened by name (training, `cnnlab data`, `cnnlab explain`).
The result of `prepare`, `Splits`, holds every split as decoded uint8 (N, C, H, W) in memory when it
fits (the fast path), else as files that `loader.py` streams through a DataLoader. Channels and
mean/std are data/stats.py's definitions; the cache folder is base.cache_dir(), read at call time.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnlab.config import ConfigError, DataConfig
from cnnlab.data.catalog import DATASETS
from cnnlab.data.base import DataSource, ImageSet, cache_dir, decode, eval_resize, open_image
from cnnlab.data.stats import split_channels, training_stats
from cnnlab.registry import UnknownNameError

MEMORY_BUDGET = 6 * 2**30  # bytes of uint8 pixels kept resident by default; CNNLAB_MEMORY_BUDGET overrides it


def memory_budget(env=os.environ) -> int:
    """CNNLAB_MEMORY_BUDGET (bytes; read when a data set is opened, not when cnnlab is imported), else 6 GiB."""
    value = env.get("CNNLAB_MEMORY_BUDGET", "").strip()
    if not value:
        return MEMORY_BUDGET
    try:
        budget = int(float(value))
    except (ValueError, OverflowError):
        budget = -1
    if budget < 0:
        raise ConfigError(f"CNNLAB_MEMORY_BUDGET={value!r}: must be a number of bytes >= 0 (e.g. 6442450944 for "
                          "6 GiB; 0 streams every data set from disk)")
    return budget


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    classes: list[str]
    channels: int
    size: int  # square side of every image
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_split: str  # "test" when there is a test split, else "val"
    description: str = ""
    indices: dict = field(default_factory=dict)  # split name -> indices into the source's train split
    notes: list[str] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)  # data-check findings (warnings; errors refuse to start)

    @property
    def eval_set(self) -> ImageSet:
        return self.test if self.test is not None else self.val

    def summary(self) -> dict:
        sets = {"train": self.train, "val": self.val, "test": self.test}
        counts = {k: {c: int(n) for c, n in zip(self.classes, np.bincount(s.labels, minlength=len(self.classes)))}
                  for k, s in sets.items() if s is not None}
        return {"classes": self.classes, "num_classes": len(self.classes), "in_channels": self.channels,
                "input_size": self.size, "mean": list(self.mean), "std": list(self.std),
                "sizes": {k: len(s) for k, s in sets.items() if s is not None}, "counts": counts,
                "eval_split": self.eval_split, "description": self.description, "notes": self.notes}


def carve(labels: np.ndarray, amount: float | int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of range(len(labels)) into (keep, held_out); `amount` a fraction or a count."""
    n = len(labels)
    idx = np.arange(n)
    if not amount:
        return idx, idx[:0]
    k = int(round(amount * n)) if isinstance(amount, float) else int(amount)
    if k == 0:
        raise ConfigError(f"data.{what}={amount!r} is {amount * n:.2g} of the {n} training images, which rounds "
                          f"to none; hold out at least one image (or set it to 0 for none)")
    if k >= n:
        raise ValueError(f"data.{what}={amount!r} asks for {k} of only {n} training images")
    counts = np.bincount(labels)
    stratify = labels if (counts[counts > 0].min() >= 2 and k >= len(counts[counts > 0])
                          and n - k >= len(counts[counts > 0])) else None
    from sklearn.model_selection import train_test_split  # here: ~1 s of import that most commands never need

    keep, held = train_test_split(idx, test_size=k, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(keep), np.sort(held)


def carve_last(labels: np.ndarray, amount: float | int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The last `amount` (a fraction or a count) of range(len(labels)) held out, in the data set's order,
    as the classic CIFAR-10 split (the first 49,000 images train, the last 1,000 validate)."""
    n = len(labels)
    k = int(round(amount * n)) if isinstance(amount, float) else int(amount)
    if k >= n:
        raise ValueError(f"data.{what}={amount!r} asks for {k} of only {n} training images")
    return np.arange(n - k), np.arange(n - k, n)


def _file_key(files: list[str], channels: int, size: int | None, resize: tuple = ("squash", None)) -> str:
    """The cache key of decoded files: the preprocessing, and every file's path and identity: a file's size,
    mtime and ctime in nanoseconds, a zip member's size and CRC-32 from the archive's index (a content hash
    for free). Any replaced, edited or touched file changes the key."""
    from cnnlab.data.base import _open_zip, split_ref

    geometry = "" if tuple(resize) == ("squash", None) else f"|{resize[0]}|{resize[1]}"  # squash keeps old keys
    h = hashlib.sha256(f"v2|{channels}|{size}|{len(files)}{geometry}".encode())
    for f in files:
        if f.startswith("hf:"):  # a Hugging Face row: the split's fingerprint names its content
            from cnnlab.data import hf

            stamp = hf.stamp(f)
        elif (parts := split_ref(f)) is not None:  # a zip member (a plain file may have '::' in its name)
            archive, member = parts
            try:
                info = _open_zip(archive).getinfo(member)
                stamp = f"{info.file_size}|{info.CRC}"
            except (OSError, KeyError, ValueError):
                stamp = "?"
        else:
            try:
                st = os.stat(f)
                stamp = f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
            except OSError:
                stamp = "?"
        h.update(f"{f}\0{stamp}\0".encode())
    return h.hexdigest()[:24]


PROGRESS_FROM = 2000  # images: decoding fewer is quick enough to need no progress


class _DecodeProgress:
    """The first decode of a large data set takes a minute or more: say so on stderr, with a count
    every few seconds, so a first run does not look hung. Later runs read the cache and print nothing."""

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.n, self.every_s = total, 0, every_s
        self.on = total >= PROGRESS_FROM
        self.t0 = self.last = time.perf_counter()
        if self.on:
            print(f"decoding {total} images (the first time only: later runs read the decoded cache)",
                  file=sys.stderr, flush=True)

    def update(self) -> None:
        self.n += 1
        now = time.perf_counter()
        if self.on and now - self.last >= self.every_s and self.n < self.total:
            rate = self.n / (now - self.t0)
            print(f"  decoded {self.n}/{self.total} images, about {int((self.total - self.n) / rate)}s to go",
                  file=sys.stderr, flush=True)
            self.last = now

    def done(self, path: Path) -> None:
        if self.on:
            print(f"  decoded {self.n}/{self.total} images in {time.perf_counter() - self.t0:.0f}s; cached in {path}",
                  file=sys.stderr, flush=True)


def _checksum(images: torch.Tensor) -> int:
    import zlib

    return zlib.crc32(memoryview(images.contiguous().numpy()).cast("B"))


def _read_cache(path: Path, n: int, channels: int, size: int | None) -> torch.Tensor | None:
    """A cache entry, verified: the checksum written with it, its shape and dtype; None (and the entry
    removed, so it is rebuilt) when anything is off."""
    if not path.is_file():
        return None
    try:  # memory-mapped: no copy on load, and parallel runs (a study's --jobs) share the page cache
        entry = torch.load(path, weights_only=True, mmap=True)
        images = entry.get("images") if isinstance(entry, dict) else None
        why = None
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            why = "not a uint8 (N, C, H, W) tensor"
        elif images.shape[:2] != (n, channels) or (size is not None and images.shape[2:] != (size, size)):
            why = f"shape {tuple(images.shape)}, expected ({n}, {channels}, ...)"
        elif entry.get("crc32") != _checksum(images):
            why = "checksum mismatch"
    except Exception as e:  # unreadable, wrong type, missing keys
        why = f"unreadable ({type(e).__name__})"
    if why is None:
        return images
    import sys

    print(f"cnnlab: warning: decoded-cache entry {path} is damaged ({why}); decoding the images again",
          file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return None


def _write_cache(path: Path, images: torch.Tensor) -> None:
    """Write a decoded cache entry atomically. A full or unwritable disk costs only the cache: the
    temporary file is removed and training goes on without it, with a warning."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "crc32": _checksum(images), "format": 2}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        print(f"cnnlab: warning: cannot write the decoded-image cache {path} ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); going on without it (set CNNLAB_CACHE to a folder "
              "with free space to cache decoded images)", file=sys.stderr, flush=True)


def decode_all(files: list[str], channels: int, size: int | None, *, threads: int | None = None,
               resize: tuple = ("squash", None)) -> torch.Tensor:
    """Decode files into one (N, C, S, S) uint8 tensor; cached on disk, keyed by the files and preprocessing
    (`resize`: the data.resize mode and the shorter side of "crop"), each entry verified against the
    checksum written with it."""
    key = _file_key(files, channels, size, resize)
    path = cache_dir() / "decoded" / f"{key}.pt"
    cached = _read_cache(path, len(files), channels, size)
    if cached is not None:
        return cached
    if size is None:
        first = open_image(files[0]).size
        size_hw = (first[1], first[0])
    else:
        size_hw = (size, size)
    out = torch.empty(len(files), channels, *size_hw, dtype=torch.uint8)

    def work(i: int) -> None:
        t = decode(files[i], channels, size, *resize)
        if t.shape[1:] != out.shape[2:]:
            raise ValueError(f"{files[i]}: image is {t.shape[2]}x{t.shape[1]} but the first image is "
                             f"{size_hw[1]}x{size_hw[0]}; set data.image_size to resize them all")
        out[i] = t

    show = _DecodeProgress(len(files))
    with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 2) * 2)) as pool:
        for _ in pool.map(work, range(len(files)), chunksize=256):
            show.update()
    show.done(path)
    _write_cache(path, out)
    return out


def resize_images(images: torch.Tensor, size: int, resize: tuple = ("squash", None)) -> torch.Tensor:
    """In-memory uint8 (N, C, H, W) brought to `size` x `size` as base.fit brings a file (squash | crop | pad)."""
    mode, resize_size = resize
    if images.shape[-1] == size and images.shape[-2] == size and resize_size in (None, size):
        return images
    if mode == "crop":
        from torchvision.transforms.v2 import functional as F

        return F.center_crop(F.resize(images, resize_size or size, antialias=True), [size, size])
    if mode == "pad":
        from torchvision.transforms.v2 import functional as F

        h, w = images.shape[-2:]
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        images = F.pad(images, [left, top, side - w - left, side - h - top], fill=0)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and images.shape[1] == 3:  # ITU-R 601-2 luma, as Pillow's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")


def _image_hw(s: ImageSet) -> tuple[int, int]:
    if s.images is not None:
        return int(s.images.shape[-2]), int(s.images.shape[-1])
    w, h = open_image(s.files[0]).size
    return h, w


def open_source(name: str, *, root: str | None = None, download: bool = True, options: dict | None = None,
                paths: bool = False) -> DataSource:
    """The registered data set `name`, opened from `root` (downloading when allowed) with its options.
    `paths`: a folder or .zip path given as the name is read as the `folder` data set (`cnnlab data ...`)."""
    if paths and name not in DATASETS and (Path(name).exists() or "/" in name or name.endswith(".zip")):
        if not Path(name).exists():
            raise FileNotFoundError(f"{name!r}: no such folder or zip file")
        p = Path(name)
        if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".tab"):  # a manifest (data/manifest.py)
            return DATASETS.get("csv")(name, **(options or {}))
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):  # save_to_disk
            return DATASETS.get("hf")(name, **(options or {}))
        return DATASETS.get("folder")(name)
    try:
        fn = DATASETS.get(name)
    except UnknownNameError as e:
        if not paths:
            raise
        raise UnknownNameError(f"{name!r} is neither a path that exists nor a data set name: {e}") from None
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):  # those with **options check their own
        takes = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "download"]
        for key in options or {}:
            if key not in takes:
                raise ConfigError(f"data.options.{key}: data set {name!r} takes no option {key!r} "
                                  f"(it takes: {', '.join(takes) or 'none'})")
    return fn(root, download=download, **(options or {}))


def prepare(d: DataConfig, *, split_seed: int = 0, want_memory: bool | None = None) -> Splits:
    """Load the data set a DataConfig names and return its train/val/test splits, decoded where they fit."""
    src = open_source(d.name, root=d.root, download=d.download, options=d.options)
    findings = []
    if d.check:  # the fast checks; an error (labels out of range, unreadable files...) refuses to start
        from cnnlab.data.check import require_trainable

        findings = require_trainable(src)
    notes = []
    train = src.train
    base_index = np.arange(len(train))
    indices: dict[str, np.ndarray] = {}
    test = src.test
    if test is None and d.test_split:
        keep, held = carve(train.labels, d.test_split, split_seed, "test_split")
        test, train, base_index = train.subset(held), train.subset(keep), base_index[keep]
        indices["test"] = held
    val = src.val
    if val is None:
        if not d.val_split:
            raise ValueError("data.val_split is 0 and the data set has no val split: a validation split is needed "
                             "to choose the best epoch")
        if d.val_from == "last":
            keep, held = carve_last(train.labels, d.val_split, "val_split")
            missing = sorted(set(range(len(src.classes))) - set(train.labels[held].tolist()))
            if missing:
                notes.append(f"data.val_from=last: the last {len(held)} images hold no image of "
                             f"{len(missing)} classes ({', '.join(src.classes[i] for i in missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}); the files are in class order, so "
                             "data.val_from=random (stratified) would suit this data set better")
        else:
            keep, held = carve(train.labels, d.val_split, split_seed + 1, "val_split")
        indices["val"] = base_index[held]
        val, train, base_index = train.subset(held), train.subset(keep), base_index[keep]
    if d.limit_train and d.limit_train < len(train):
        keep, _ = carve(train.labels, len(train) - d.limit_train, split_seed + 2, "limit_train")
        train, base_index = train.subset(keep), base_index[keep]
        notes.append(f"training on a stratified subset of {d.limit_train} images (data.limit_train)")
    indices["train"] = base_index
    if test is None:
        notes.append("this data set has no test split: the final evaluation uses the validation split")

    channels = d.channels or split_channels(src.train)
    if not d.image_size:  # the models take square images; a mid-run shape error would be the alternative
        h, w = _image_hw(src.train)
        if h != w:
            first = f" ({src.train.files[0]})" if src.train.files else ""
            raise ConfigError(f"data.image_size is not set and the images are {w}x{h} (width x height){first}, "
                              "not square; set data.image_size to resize them all to a square")
    sets = {"train": train, "val": val, "test": test}
    pixels = sum(len(s) for s in sets.values() if s is not None) * channels * (d.image_size or 64) ** 2
    memory = want_memory if want_memory is not None else (
        d.loader == "memory" or (d.loader == "auto" and pixels <= memory_budget()))
    for k, s in sets.items():
        if s is None:
            continue
        # training images: data.resize; evaluation: the pretrained weights' resize-then-crop when set
        geometry = eval_resize(d) if k != "train" else (d.resize, None)
        if s.images is not None:
            imgs = to_channels(s.images, channels)
            if d.image_size:
                imgs = resize_images(imgs, d.image_size, geometry)
            sets[k] = ImageSet(labels=s.labels, classes=s.classes, images=imgs, ids=s.ids)
        elif memory:
            sets[k] = ImageSet(labels=s.labels, classes=s.classes, ids=s.ids,
                               images=decode_all(s.files, channels, d.image_size, resize=geometry))
        else:
            sets[k] = ImageSet(labels=s.labels, classes=s.classes, ids=s.ids, files=s.files, resize=geometry)
    if memory:
        from cnnlab.data.base import _open_zip

        _open_zip.cache_clear()  # the archive's member index (~1 KB a file) is not needed once decoded
    train = sets["train"]
    if train.images is not None:
        size = int(train.images.shape[-1])
    else:
        size = d.image_size or open_image(train.files[0]).size[0]
    if d.mean is not None and d.std is not None:
        mean, std = tuple(d.mean), tuple(d.std)
    else:
        mean, std = training_stats(train, channels, d.image_size)
    if len(mean) != channels:
        raise ValueError(f"data.mean has {len(mean)} values but the images have {channels} channels")
    return Splits(train=train, val=sets["val"], test=sets["test"], classes=src.classes, channels=channels,
                  size=size, mean=mean, std=std, eval_split="test" if sets["test"] is not None else "val",
                  description=src.description, indices={k: np.asarray(v) for k, v in indices.items()}, notes=notes,
                  findings=[f.to_dict() for f in findings])


def save_splits(splits: Splits, path: Path) -> None:
    """The split indices (into the data set's own train split) and ids, so a split can be audited."""
    arrays = {f"{k}_index": v for k, v in splits.indices.items()}
    for k in ("train", "val", "test"):
        s = getattr(splits, k)
        if s is not None:
            arrays[f"{k}_ids"] = np.array(s.ids)
    np.savez_compressed(path, **arrays)


def describe(splits: Splits) -> str:
    return json.dumps(splits.summary(), indent=1)
