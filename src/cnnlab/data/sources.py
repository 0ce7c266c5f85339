"""The built-in data sets. Each is one function `(root, *, download, **options) -> DataSource`.

Files are looked for in `root`, then where a system package puts them; official downloads are
verified against their checksums before anything is extracted or read (see download.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnlab.data._registry import DATASETS
from cnnlab.data.base import ZIP_SEP, DataSource, ImageSet, _open_zip

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@DATASETS.register("digits")
def digits(root: str | None = None, *, download: bool = False) -> DataSource:
    """scikit-learn's 1,797 8x8 grey digits (0-16 scaled to 0-255). Always available, no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    classes = [str(c) for c in d.target_names]
    images = torch.from_numpy(imgs).unsqueeze(1)  # (N, 1, 8, 8)
    ids = [f"digits/{i}" for i in range(len(imgs))]
    train = ImageSet(labels=d.target, classes=classes, images=images, ids=ids)
    return DataSource(train=train, classes=classes, description="scikit-learn digits, 8x8 grey")


def _list_tree(root: str) -> list[str]:
    """All image paths under a folder, or members of a zip as 'zip::member', relative to the tree."""
    p = Path(root)
    if p.is_file() and p.suffix.lower() == ".zip":
        names = [n for n in _open_zip(str(p)).namelist() if not n.endswith("/")]
        return [n for n in names if Path(n).suffix.lower() in IMAGE_EXTS and "__MACOSX" not in n]
    return [str(f.relative_to(p)) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTS]


def _class_folders(root: str) -> list[str]:
    """Class folder names of a tree (empty folders included, so a check can report them)."""
    p = Path(root)
    if p.is_file():
        return []
    return sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


@DATASETS.register("folder")
def folder(root: str | None = None, *, download: bool = False) -> DataSource:
    """One folder per class (`root/<class>/*.jpg`), or `root/{train,val,test}/<class>/...`; a folder or a .zip.

    A zip may hold the tree under one top folder (as `train/<class>/...` alone does).
    """
    if root is None:
        raise FileNotFoundError("data.name=folder needs data.root: a folder of class folders, or a .zip of one")
    p = Path(root)
    if not p.exists():
        raise FileNotFoundError(f"data.root={root!r} does not exist")
    rels = _list_tree(root)
    if not rels:
        raise FileNotFoundError(f"data.root={root!r} holds no image files ({', '.join(sorted(IMAGE_EXTS))})")
    prefix = ZIP_SEP if p.is_file() else "/"
    ref = (lambda rel: f"{p}{ZIP_SEP}{rel}") if p.is_file() else (lambda rel: str(p / rel))
    parts = [Path(r).parts for r in rels]

    # Where does the split/class structure start? Depth of <class>/<file> is the last two parts.
    depth = {len(x) for x in parts}
    if len(depth) != 1:
        raise ValueError(f"data.root={root!r}: images lie at different depths; expected <class>/<image> "
                         "or <split>/<class>/<image> throughout")
    depth = depth.pop()
    if depth < 2:
        raise ValueError(f"data.root={root!r}: images must lie in class folders (<class>/<image>)")
    split_of = {}
    top = {x[depth - 3] for x in parts} if depth >= 3 else set()
    has_splits = depth >= 3 and top and all(t.lower() in SPLIT_NAMES for t in top)
    for x in parts:
        split_of[x] = SPLIT_NAMES[x[depth - 3].lower()] if has_splits else "train"
    class_names = sorted({x[-2] for x in parts})
    if p.is_dir():  # empty class folders still count as classes (the check reports them)
        base = p
        if has_splits:
            for s in sorted(top):
                for d in (base.joinpath(*parts[0][: depth - 3], s)).iterdir():
                    if d.is_dir():
                        class_names.append(d.name)
        elif depth == 2:
            class_names += _class_folders(root)
        class_names = sorted(set(class_names))
    index = {c: i for i, c in enumerate(class_names)}
    splits: dict[str, tuple[list, list]] = {}
    for rel, x in zip(rels, parts):
        files, labels = splits.setdefault(split_of[x], ([], []))
        files.append(ref(rel))
        labels.append(index[x[-2]])
    del prefix

    def make(name: str) -> ImageSet | None:
        if name not in splits:
            return None
        files, labels = splits[name]
        return ImageSet(labels=np.array(labels), classes=class_names, files=files)

    if "train" not in splits:
        raise ValueError(f"data.root={root!r}: found splits {sorted(splits)} but no train split")
    return DataSource(train=make("train"), val=make("val"), test=make("test"), classes=class_names,
                      description=f"image folder {root}")
