"""Building data sets from others: MNIST-M (Ganin & Lempitsky 2015) and a class-exclusive COCO subset.

Both write a folder data set (`<split>/<class>/<image>` or `<class>/<image>`), seeded, so the
same command gives the same files.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import io
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cnnlab.data.base import open_image, to_mode
from cnnlab.data.sources import IMAGE_EXTS


def _empty_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: the folder is not empty; give a new folder so two builds never mix")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------
# MNIST-M


def _backgrounds(folder: str | Path, min_side: int) -> list[np.ndarray]:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    bgs = []
    for f in files:
        arr = np.asarray(to_mode(open_image(str(f)), 3), dtype=np.uint8)  # (H, W, 3)
        if min(arr.shape[:2]) >= min_side:
            bgs.append(arr)
    if not bgs:
        raise FileNotFoundError(f"--backgrounds {folder}: no colour images of at least {min_side}x{min_side} "
                                f"pixels ({', '.join(sorted(IMAGE_EXTS))}); the paper used BSDS500 photos")
    return bgs


def blend(digit: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """|crop - digit| per channel: a (H, W) uint8 digit over a random (H, W, 3) crop of a photo."""
    h, w = digit.shape
    y = int(rng.integers(0, background.shape[0] - h + 1))
    x = int(rng.integers(0, background.shape[1] - w + 1))
    crop = background[y:y + h, x:x + w].astype(np.int16)
    return np.abs(crop - digit[:, :, None].astype(np.int16)).astype(np.uint8)


def build_mnist_m(mnist: str | Path, backgrounds: str | Path, out: str | Path, *, seed: int = 0,
                  limit: int | None = None, log: Callable[[str], None] = print) -> dict[str, int]:
    """MNIST-M from the MNIST IDX files in `mnist` and the photos in `backgrounds`.

    Every digit gets a random photo and a random crop position (seeded), and is written as
    `out/{train,test}/<digit>/<index>.png`. `limit` keeps the first N of each split. Returns counts.
    """
    from cnnlab.data.official import mnist as load_mnist

    src = load_mnist(str(mnist), download=False)
    side = int(src.train.images.shape[-1])
    bgs = _backgrounds(backgrounds, side)
    out = _empty_out(out)
    rng = np.random.default_rng(seed)
    counts = {}
    for split, s in (("train", src.train), ("test", src.test)):
        n = len(s) if limit is None else min(limit, len(s))
        for c in src.classes:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        digits = s.images[:n, 0].numpy()  # (N, 28, 28)
        for i in range(n):
            img = blend(digits[i], bgs[int(rng.integers(len(bgs)))], rng)
            Image.fromarray(img, "RGB").save(out / split / src.classes[s.labels[i]] / f"{i:05d}.png")
        counts[split] = n
        log(f"{split}: {n} images")
    log(f"MNIST-M written to {out} from {len(bgs)} background photos (seed {seed})")
    return counts


# ----------------------------------------------------------------------------------------------
# COCO subset


def coco_candidates(annotations: str | Path, classes: list[str]) -> tuple[object, dict[str, list[int]]]:
    """Image ids per class holding that class and none of the other chosen ones (sorted)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(annotations))
    names = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    for c in classes:
        if c not in names:
            close = difflib.get_close_matches(c, list(names), n=3)
            hint = f" Did you mean {' or '.join(repr(x) for x in close)}?" if close else ""
            raise ValueError(f"--classes: {c!r} is not a category of {annotations}.{hint}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"--classes: {classes} names a class twice")
    chosen = {names[c]: c for c in classes}
    present: dict[int, set[str]] = {}
    for ann in coco.loadAnns(coco.getAnnIds(catIds=list(chosen))):
        present.setdefault(ann["image_id"], set()).add(chosen[ann["category_id"]])
    cands = {c: sorted(i for i, cs in present.items() if cs == {c}) for c in classes}
    return coco, cands


def coco_subset(annotations: str | Path, images: str | Path, classes: list[str], out: str | Path, *,
                per_class: int, size: int, seed: int = 0, jobs: int | None = None,
                log: Callable[[str], None] = print) -> dict[str, int]:
    """A folder data set `out/<class>/<image id>.png` of `per_class` COCO images per class.

    Only images holding exactly one of `classes` are candidates, so no image lands in two classes.
    Each class is sampled with its own generator seeded by (seed, class name), images are resized
    to `size` x `size` (the whole image, not a crop); `out/manifest.csv` lists coco image id,
    class and source file. Raises ValueError, before writing anything, when a class falls short.
    Returns the candidate count per class.
    """
    coco, cands = coco_candidates(annotations, classes)
    width = max(len(c) for c in classes)
    for c in classes:
        log(f"{c:<{width}}  {len(cands[c]):>7,} candidate images (with {c} and none of the other classes)")
    short = [f"{c} has {len(cands[c])}" for c in classes if len(cands[c]) < per_class]
    if short:
        raise ValueError(f"--per-class {per_class}: not enough images holding only one chosen class: "
                         f"{'; '.join(short)}. Ask for fewer, or choose other classes.")
    rows = []
    for c in classes:
        rng = np.random.default_rng([seed, zlib.crc32(c.encode())])
        for img_id in sorted(rng.choice(cands[c], size=per_class, replace=False).tolist()):
            rows.append((img_id, c, str(Path(images) / coco.imgs[img_id]["file_name"])))
    missing = [r[2] for r in rows if not os.path.isfile(r[2])]
    if missing:
        raise FileNotFoundError(f"--images {images}: {len(missing)} sampled image files are missing, "
                                f"e.g. {missing[0]}")
    out = _empty_out(out)
    for c in classes:
        (out / c).mkdir()

    def write(row: tuple[int, str, str]) -> str:
        img_id, c, src = row
        with Image.open(src) as im:
            im.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a reduced scale, still >= 2x the target
            img = to_mode(im, 3).resize((size, size), Image.BICUBIC)
        rel = f"{c}/{img_id}.png"
        img.save(out / rel)
        return rel

    with ThreadPoolExecutor(max_workers=jobs or min(8, os.cpu_count() or 1)) as ex:
        written = list(ex.map(write, rows))
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["coco_image_id", "class", "source_file", "file"])
        for (img_id, c, src), rel in zip(rows, written):
            w.writerow([img_id, c, src, rel])
    log(f"wrote {len(rows)} images ({per_class} per class, {size}x{size}) and manifest.csv to {out}")
    return {c: len(cands[c]) for c in classes}
