"""Official releases as registered data sets: MNIST, Fashion-MNIST, CIFAR-10/100, STL-10, SVHN, MNIST-M.

Files are looked for in `root`, then in /usr/share/datasets/<name>/ (system packages), then in
<cache>/<name> (`base.cache_dir()`: $CNNLAB_CACHE or ~/.cache/cnnlab); missing ones are downloaded
from the official URL and verified first.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data._registry import DATASETS
from cnnlab.data.base import DataSource, ImageSet, cache_dir
from cnnlab.data.download import download as fetch, file_hash, restricted_load, safe_extract, verify

SYSTEM_DIR = Path("/usr/share/datasets")  # where `apt-get install dataset-<name>` puts files
DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class STL10Source(DataSource):
    """STL-10 with its 100,000 unlabeled images (labels -1) kept apart from the labelled splits."""

    unlabeled: ImageSet | None = None


# ----------------------------------------------------------------------------------------------
# Finding files


def _places(name: str, root: str | None) -> list[Path]:
    places = [Path(root).expanduser()] if root else []
    places.append(SYSTEM_DIR / name)
    if not root:
        places.append(cache_dir() / name)
    return places


def _target(name: str, root: str | None) -> Path:
    """Where downloads and extractions go."""
    return Path(root).expanduser() if root else cache_dir() / name


def _find(places: list[Path], files: list[str], subdirs: tuple[str, ...] = ("",),
          gz: bool = False) -> dict[str, Path] | None:
    """The first folder (a place, or a subdir of one) holding every file (or its .gz when `gz`)."""
    for d in (p / s if s else p for p in places for s in subdirs):
        found = {f: next((d / c for c in ([f, f + ".gz"] if gz else [f]) if (d / c).exists()), None) for f in files}
        if all(found.values()):
            return found
    return None


def _missing(name: str, places: list[Path], files: list[str], get: str) -> FileNotFoundError:
    where = ", ".join(str(p) for p in places)
    return FileNotFoundError(
        f"data set {name!r}: {', '.join(files)} not found (looked in {where}) and download is off. "
        f"To get it: {get}; or put the files in data.root.")


def _fetch_hint(url: str) -> str:
    return f"set data.download: true to fetch {url}, checksum-verified"


def _options(name: str, options: dict, **defaults):
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise ValueError(f"data.options for {name!r}: unknown key {unknown[0]!r} (known: {known})")
    return [options.get(k, v) for k, v in defaults.items()]


def _ids(name: str, split: str, n: int) -> list[str]:
    return [f"{name}/{split}/{i}" for i in range(n)]


def _check_labels(path, labels: np.ndarray, n_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise ValueError(f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{n_classes - 1}; "
                         "the file is damaged or not the official one")


# ----------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array, after checking its header against its size."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # a cut download, a damaged .gz
            raise ValueError(f"{path}: not a complete gzip file ({type(e).__name__}: {e}); delete it to "
                             "download it again, or replace it") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4].hex()})")
    nd = data[3]
    if len(data) < 4 + 4 * nd:
        raise ValueError(f"{path}: the IDX header announces {nd} dimensions but the file ends after "
                         f"{len(data)} bytes; it is truncated or damaged")
    dims = struct.unpack(f">{nd}I", data[4:4 + 4 * nd])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    body = memoryview(data)[4 + 4 * nd:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: the header says shape {dims} but the file holds {len(body)} data bytes; "
                         "it is truncated or damaged")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
IDX_SETS = {  # mirrors and md5s of the .gz files, as published (and as torchvision checks them)
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
              ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
               "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"], DIGITS, "MNIST"),
    "fashion-mnist": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                      ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                       "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"], FASHION,
                      "FashionMNIST"),
}


def _idx_source(name: str, root: str | None, download: bool, options: dict) -> DataSource:
    _options(name, options)
    mirrors, md5s, classes, tv = IDX_SETS[name]
    places = _places(name, root)
    found = _find(places, IDX_FILES, subdirs=("", f"{tv}/raw"), gz=True)
    if found is None:
        if not download:
            get = _fetch_hint(mirrors[0])
            raise _missing(name, places, [f + ".gz" for f in IDX_FILES],
                           f"`apt-get install dataset-{name}` (into {SYSTEM_DIR / name}), or {get}"
                           if name == "fashion-mnist" else get)
        target = _target(name, root)
        found = {f: fetch([m + f + ".gz" for m in mirrors], target / (f + ".gz"), md5=md5)
                 for f, md5 in zip(IDX_FILES, md5s)}
    splits = {}
    for split, (img_f, lab_f) in {"train": IDX_FILES[:2], "test": IDX_FILES[2:]}.items():
        images, labels = read_idx(found[img_f]), read_idx(found[lab_f]).astype(np.int64)  # (N, 28, 28), (N,)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{found[img_f]}: {images.shape} images do not match {labels.shape} labels "
                             f"in {found[lab_f]}")
        _check_labels(found[lab_f], labels, len(classes))
        splits[split] = ImageSet(labels=labels, classes=classes, ids=_ids(name, split, len(labels)),
                                 images=torch.from_numpy(images.astype(np.uint8, copy=False)).unsqueeze(1))
    # local copies are read by the strict reader above; say whether they are the published bytes too
    same = all(p.suffix == ".gz" and file_hash(p, "md5") == m for p, m in zip(found.values(), md5s))
    how = "the published .gz files" if same else "a repackaged copy (not the published .gz bytes; headers checked)"
    return DataSource(train=splits["train"], test=splits["test"], classes=classes,
                      description=f"{name} IDX files in {found[IDX_FILES[0]].parent}: {how}")


@DATASETS.register("mnist")
def mnist(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """MNIST: 60,000 train / 10,000 test grey 28x28 digits (LeCun et al.)."""
    return _idx_source("mnist", root, download, options)


@DATASETS.register("fashion-mnist")
def fashion_mnist(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """Fashion-MNIST: 60,000 / 10,000 grey 28x28 clothing images (Xiao et al. 2017)."""
    return _idx_source("fashion-mnist", root, download, options)


# ----------------------------------------------------------------------------------------------
# Archives: CIFAR, STL-10, MNIST-M (.pt)


def _archive_files(name: str, root: str | None, download: bool, folder: str, files: list[str],
                   archives: list[tuple[str, str]], hint: str = "") -> dict[str, Path]:
    """`files` inside `folder`: found extracted, or extracted from an archive found or downloaded.

    `archives` are (url, md5) pairs; an archive is verified before it is extracted.
    """
    places = _places(name, root)
    found = _find(places, files, subdirs=(folder,))
    if found is not None:
        return found
    target = _target(name, root)
    for url, md5 in archives:
        fname = url.rsplit("/", 1)[-1]
        local = next((p / fname for p in places if (p / fname).is_file()), None)
        if local is not None:
            verify(local, md5=md5)
        elif download:
            local = fetch(url, target / fname, md5=md5)
        else:
            raise _missing(name, places, [f"{folder}/{f}" if folder else f for f in files] + [f"or {fname}"],
                           _fetch_hint(url) + hint)
        # extract next to the archive unless that place is read-only (a system package)
        safe_extract(local, local.parent if os.access(local.parent, os.W_OK) else target)
    found = _find([target] + places, files, subdirs=(folder,))
    if found is None:
        raise FileNotFoundError(f"data set {name!r}: the archive did not hold {folder}/{', '.join(files)}")
    return found


CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], meta="meta"),
}


def _unpickle(path: Path) -> dict:
    d = restricted_load(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(name: str, root: str | None, download: bool, label: str) -> DataSource:
    spec = CIFAR[name]
    files = spec["train"] + spec["test"] + [spec["meta"]]
    found = _archive_files(name, root, download, spec["folder"], files, [(spec["url"], spec["md5"])])
    label_key, names_key = ("labels", "label_names") if name == "cifar10" else \
        (f"{label}_labels", f"{label}_label_names")
    meta = _unpickle(found[spec["meta"]])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    splits = {}
    for split in ("train", "test"):
        data, labels = [], []
        for f in spec[split]:
            d = _unpickle(found[f])
            if "data" not in d or label_key not in d:
                raise ValueError(f"{found[f]}: missing key 'data' or {label_key!r} (has {sorted(d)})")
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(d[label_key]):
                raise ValueError(f"{found[f]}: 'data' has shape {x.shape}, expected (N, 3072) with N labels")
            data.append(x)
            labels.append(np.asarray(d[label_key], dtype=np.int64))
        y = np.concatenate(labels)
        _check_labels(found[spec[split][0]], y, len(classes))
        images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))  # rows are R, G, B planes
        splits[split] = ImageSet(labels=y, classes=classes, images=images, ids=_ids(name, split, len(y)))
    return DataSource(train=splits["train"], test=splits["test"], classes=classes,
                      description=f"{name} (official python release, {found[spec['meta']].parent})")


@DATASETS.register("cifar10")
def cifar10(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """CIFAR-10: 50,000 / 10,000 colour 32x32 images in 10 classes (Krizhevsky 2009)."""
    _options("cifar10", options)
    return _cifar("cifar10", root, download, "fine")


@DATASETS.register("cifar100")
def cifar100(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """CIFAR-100: 100 fine classes; option label="coarse" uses the 20 superclasses instead."""
    (label,) = _options("cifar100", options, label="fine")
    if label not in ("fine", "coarse"):
        raise ValueError(f"data.options.label={label!r}: must be fine or coarse")
    return _cifar("cifar100", root, download, label)


STL10 = dict(url="http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
             md5="91f7769df0f17e558f3565bffb0c7dfb", folder="stl10_binary")


def _stl_images(path: Path) -> torch.Tensor:
    """(N, 3, 96, 96) uint8 from STL-10's column-major binary; memory-mapped, copied on write."""
    size = path.stat().st_size
    if size % (3 * 96 * 96):
        raise ValueError(f"{path}: {size} bytes is not a whole number of 3x96x96 images")
    x = np.memmap(path, dtype=np.uint8, mode="c").reshape(-1, 3, 96, 96)
    return torch.from_numpy(x).permute(0, 1, 3, 2)  # each channel is stored column by column


@DATASETS.register("stl10")
def stl10(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """STL-10: 5,000 / 8,000 colour 96x96 images, 10 classes (Coates et al. 2011).

    Options: `fold` (0-9) trains on one of the ten predefined 1,000-image folds; `unlabeled: true`
    also maps the 100,000 unlabeled images (as `source.unlabeled`, labels -1).
    """
    fold, unlabeled = _options("stl10", options, fold=None, unlabeled=False)
    files = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt", "fold_indices.txt"]
    files += ["unlabeled_X.bin"] if unlabeled else []
    found = _archive_files("stl10", root, download, STL10["folder"], files, [(STL10["url"], STL10["md5"])])
    classes = [c.strip() for c in found["class_names.txt"].read_text().splitlines() if c.strip()]
    splits = {}
    for split in ("train", "test"):
        x = _stl_images(found[f"{split}_X.bin"])
        y = np.fromfile(found[f"{split}_y.bin"], dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
        if len(y) != len(x):
            raise ValueError(f"{found[f'{split}_y.bin']}: {len(y)} labels for {len(x)} images")
        _check_labels(found[f"{split}_y.bin"], y, len(classes))
        splits[split] = ImageSet(labels=y, classes=classes, images=x.contiguous(), ids=_ids("stl10", split, len(y)))
    if fold is not None:
        folds = found["fold_indices.txt"].read_text().splitlines()
        if not (isinstance(fold, int) and 0 <= fold < len(folds)):
            raise ValueError(f"data.options.fold={fold!r}: must be a whole number 0..{len(folds) - 1}")
        idx = np.array(folds[fold].split(), dtype=np.int64)
        if len(idx) == 0 or idx.max() >= len(splits["train"]):
            raise ValueError(f"{found['fold_indices.txt']}: fold {fold} has indices outside the training set")
        splits["train"] = splits["train"].subset(idx)
    extra = None
    if unlabeled:
        x = _stl_images(found["unlabeled_X.bin"])
        extra = ImageSet(labels=np.full(len(x), -1), classes=classes, images=x, ids=_ids("stl10", "unlabeled", len(x)))
    return STL10Source(train=splits["train"], test=splits["test"], classes=classes, unlabeled=extra,
                       description=f"STL-10 (official binaries, {found['train_X.bin'].parent}"
                                   + (f", fold {fold})" if fold is not None else ")"))


# ----------------------------------------------------------------------------------------------
# SVHN (.mat) and MNIST-M (two releases)

SVHN = {"train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
        "test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
        "extra": ("http://ufldl.stanford.edu/housenumbers/extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")}


def _read_svhn(path: Path, split: str) -> ImageSet:
    from scipy.io import loadmat

    m = loadmat(path)
    if "X" not in m or "y" not in m:
        raise ValueError(f"{path}: expected variables X and y, found {sorted(k for k in m if not k.startswith('__'))}")
    x, y = m["X"], np.asarray(m["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ValueError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, {len(y)})")
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise ValueError(f"{path}: labels must be 1..10 (10 = digit 0), found {y.min()}..{y.max()}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8))  # (N, 3, 32, 32)
    return ImageSet(labels=y % 10, classes=DIGITS, images=images, ids=_ids("svhn", split, len(y)))


@DATASETS.register("svhn")
def svhn(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """SVHN cropped digits: 73,257 / 26,032 colour 32x32 (Netzer et al. 2011); `extra: true` adds 531,131."""
    (extra,) = _options("svhn", options, extra=False)
    splits = ["train", "test"] + (["extra"] if extra else [])
    places = _places("svhn", root)
    found = _find(places, [f"{s}_32x32.mat" for s in splits])
    if found is None:
        if not download:
            raise _missing("svhn", places, [f"{s}_32x32.mat" for s in splits], _fetch_hint(SVHN["train"][0]))
        found = {f"{s}_32x32.mat": fetch(SVHN[s][0], _target("svhn", root) / f"{s}_32x32.mat", md5=SVHN[s][1])
                 for s in splits}
    sets = {s: _read_svhn(found[f"{s}_32x32.mat"], s) for s in splits}
    train = sets["train"]
    if extra:
        e = sets["extra"]
        train = ImageSet(labels=np.concatenate([train.labels, e.labels]), classes=DIGITS,
                         images=torch.cat([train.images, e.images]), ids=train.ids + e.ids)
    return DataSource(train=train, test=sets["test"], classes=DIGITS, description="SVHN cropped digits (.mat)")


MNIST_M_PT = [("https://github.com/liyxi/mnist-m/releases/download/data/mnist_m_train.pt.tar.gz",
               "191ed53db9933bd85cc9700558847391"),
              ("https://github.com/liyxi/mnist-m/releases/download/data/mnist_m_test.pt.tar.gz",
               "e11cb4d7fff76d7ec588b1134907db59")]


def _mnist_m_pt(path: Path, split: str) -> ImageSet:
    obj = torch.load(path, weights_only=True, map_location="cpu")
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected an (images, labels) pair, found {type(obj).__name__}")
    x, y = torch.as_tensor(obj[0]), np.asarray(torch.as_tensor(obj[1]), dtype=np.int64)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] != 3 or len(x) != len(y):
        raise ValueError(f"{path}: images {tuple(x.shape)} {x.dtype}, expected (N, H, W, 3) uint8 for {len(y)} labels")
    _check_labels(path, y, 10)
    return ImageSet(labels=y, classes=DIGITS, images=x.permute(0, 3, 1, 2).contiguous(),
                    ids=_ids("mnist-m", split, len(y)))


def _mnist_m_folder(folder: Path, labels_file: Path) -> ImageSet:
    present = set(os.listdir(folder))
    files, labels = [], []
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{labels_file}:{n}: expected 'filename label', found {line!r}")
        if parts[0] not in present:
            raise FileNotFoundError(f"{labels_file}:{n}: {parts[0]} is not in {folder}")
        files.append(str(folder / parts[0]))
        labels.append(int(parts[1]))
    y = np.array(labels, dtype=np.int64)
    _check_labels(labels_file, y, 10)
    return ImageSet(labels=y, classes=DIGITS, files=files)


@DATASETS.register("mnist-m")
def mnist_m(root: str | None = None, *, download: bool = True, **options) -> DataSource:
    """MNIST-M (Ganin & Lempitsky 2015): MNIST digits blended over colour photo patches, 28x28.

    Reads the original release (`mnist_m_train/` + `mnist_m_train_labels.txt`, file-backed) or the
    PyTorch release (`mnist_m_train.pt`, in memory); option `release`: auto | original | pt.
    `cnnlab data build-mnist-m` builds it from MNIST and photos, as a folder data set (data.name: folder).
    """
    (release,) = _options("mnist-m", options, release="auto")
    if release not in ("auto", "original", "pt"):
        raise ValueError(f"data.options.release={release!r}: must be auto, original or pt")
    places, subdirs = _places("mnist-m", root), ("", "mnist_m", "MNISTM", "MNISTM/processed")
    orig = ["mnist_m_train", "mnist_m_test", "mnist_m_train_labels.txt", "mnist_m_test_labels.txt"]
    pt = ["mnist_m_train.pt", "mnist_m_test.pt"]
    found = _find(places, pt, subdirs) if release != "original" else None
    found_orig = _find(places, orig, subdirs) if release != "pt" else None
    if found_orig and not found:  # the original release is used when no .pt files are there
        train = _mnist_m_folder(found_orig["mnist_m_train"], found_orig["mnist_m_train_labels.txt"])
        test = _mnist_m_folder(found_orig["mnist_m_test"], found_orig["mnist_m_test_labels.txt"])
        return DataSource(train=train, test=test, classes=DIGITS,
                          description=f"MNIST-M (original release, {found_orig['mnist_m_train'].parent})")
    if release == "original":
        raise _missing("mnist-m", places, orig, "build it with `cnnlab data build-mnist-m`")
    found = found or _archive_files("mnist-m", root, download, "", pt, MNIST_M_PT,
                                    " (the PyTorch release), or build the original with `cnnlab data build-mnist-m`")
    return DataSource(train=_mnist_m_pt(found["mnist_m_train.pt"], "train"),
                      test=_mnist_m_pt(found["mnist_m_test.pt"], "test"), classes=DIGITS,
                      description=f"MNIST-M (PyTorch release, {found['mnist_m_train.pt'].parent})")
