"""Builders: MNIST-M is |crop - digit| and seeded; the COCO subset never puts one image in two classes."""
from __future__ import annotations

import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.data import DATASETS
from cnnlab.data.builders import build_mnist_m, coco_candidates, coco_subset
from cnnlab.data.check import check, errors
from cnnlab.data.cli import main as data_main

pytest.importorskip("pycocotools")


def write_idx(path: Path, arr) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


@pytest.fixture(scope="module")
def mnist_and_photos(tmp_path_factory):
    base = tmp_path_factory.mktemp("mm")
    rng = np.random.default_rng(0)
    digits = {}
    for split, prefix, n in [("train", "train", 12), ("test", "t10k", 5)]:
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = np.arange(n) % 10
        write_idx(base / "mnist" / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(base / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", y)
        digits[split] = (x, y)
    photos = []
    for i, (h, w) in enumerate([(40, 50), (33, 29)]):
        p = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (base / "photos").mkdir(exist_ok=True)
        Image.fromarray(p).save(base / "photos" / f"bg{i}.png")
        photos.append(p.astype(np.int16))
    Image.new("RGB", (10, 10)).save(base / "photos" / "too_small.png")  # skipped: smaller than a digit
    return base, digits, photos


def test_build_mnist_m_blends_and_is_seeded(mnist_and_photos, tmp_path):
    base, digits, photos = mnist_and_photos
    counts = build_mnist_m(base / "mnist", base / "photos", tmp_path / "a", seed=5, log=lambda s: None)
    assert counts == {"train": 12, "test": 5}
    src = DATASETS.get("folder")(str(tmp_path / "a"))
    assert len(src.train) == 12 and len(src.test) == 5 and src.classes == [str(i) for i in range(10)]
    for split, (x, y) in digits.items():
        for i in range(len(x)):
            out = np.asarray(Image.open(tmp_path / "a" / split / str(y[i]) / f"{i:05d}.png")).astype(np.int16)
            assert out.shape == (28, 28, 3)
            d = x[i].astype(np.int16)[:, :, None]
            # some crop of some photo gives exactly |crop - digit| in every channel
            assert any(np.array_equal(np.abs(p[r:r + 28, c:c + 28] - d), out)
                       for p in photos for r in range(p.shape[0] - 27) for c in range(p.shape[1] - 27))
    build_mnist_m(base / "mnist", base / "photos", tmp_path / "b", seed=5, log=lambda s: None)
    assert data_main(["build-mnist-m", "--mnist", str(base / "mnist"), "--backgrounds", str(base / "photos"),
                      "--out", str(tmp_path / "c"), "--seed", "6"]) == 0
    same = [(tmp_path / "a" / f.relative_to(tmp_path / "b")).read_bytes() == f.read_bytes()
            for f in sorted((tmp_path / "b").rglob("*.png"))]
    other = [(tmp_path / "a" / f.relative_to(tmp_path / "c")).read_bytes() == f.read_bytes()
             for f in sorted((tmp_path / "c").rglob("*.png"))]
    assert all(same) and not all(other)
    with pytest.raises(ValueError, match="not empty"):
        build_mnist_m(base / "mnist", base / "photos", tmp_path / "a", seed=5)


# ----------------------------------------------------------------------------------------------
# COCO

CATS = {"person": 1, "bus": 6, "airplane": 5, "cat": 17, "dog": 18, "pizza": 59}
CHOSEN = ["airplane", "bus", "cat", "dog", "pizza"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO instances file whose images often hold several of the chosen classes."""
    base = tmp_path_factory.mktemp("coco")
    (base / "images").mkdir()
    rng = np.random.default_rng(7)
    images, anns, truth = [], [], {}
    for img_id in range(1, 121):
        k = rng.choice([1, 1, 2, 3])  # a third of the images hold two or three chosen classes
        cats = set(rng.choice(CHOSEN, size=k, replace=False).tolist())
        if img_id % 4 == 0:
            cats.add("person")  # an unchosen class does not disqualify an image
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        name = f"{img_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "images" / name)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})
        for c in sorted(cats):
            for _ in range(int(rng.integers(1, 3))):  # sometimes two instances of a class
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": CATS[c], "iscrowd": 0,
                             "bbox": [1, 1, 5, 5], "area": 25, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
        truth[img_id] = cats
    data = {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "x"} for n, i in CATS.items()]}
    (base / "instances.json").write_text(json.dumps(data))
    return base, truth


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_coco_subset_is_exclusive_and_seeded(coco, tmp_path, capsys):
    base, truth = coco
    _, cands = coco_candidates(base / "instances.json", CHOSEN)
    per_class = min(len(v) for v in cands.values())
    assert per_class >= 3
    args = dict(per_class=per_class, size=24, log=print)
    counts = coco_subset(base / "instances.json", base / "images", CHOSEN, tmp_path / "a", seed=1, **args)
    printed = capsys.readouterr().out
    for c in CHOSEN:
        assert f"{counts[c]:>7,} candidate images" in printed and c in printed
    rows = read_manifest(tmp_path / "a")
    ids = [int(r["coco_image_id"]) for r in rows]
    assert len(ids) == len(set(ids)) == per_class * len(CHOSEN)  # no image in two classes
    for r in rows:
        chosen_in_image = truth[int(r["coco_image_id"])] & set(CHOSEN)
        assert chosen_in_image == {r["class"]}, f"image {r['coco_image_id']} holds {chosen_in_image}"
        assert Path(r["source_file"]).name == f"{int(r['coco_image_id']):012d}.jpg"
        img = Image.open(tmp_path / "a" / r["file"])
        assert img.size == (24, 24) and img.mode == "RGB"
    src = DATASETS.get("folder")(str(tmp_path / "a"))
    assert src.classes == sorted(CHOSEN) and len(src.train) == len(rows)
    assert not errors(check(src, jobs=1))
    # the same seed gives the same subset; another seed another one
    coco_subset(base / "instances.json", base / "images", CHOSEN, tmp_path / "b", seed=1, **args)
    coco_subset(base / "instances.json", base / "images", CHOSEN, tmp_path / "c", seed=2,
                per_class=per_class - 1, size=24, log=print)
    assert read_manifest(tmp_path / "b") == rows
    assert {r["coco_image_id"] for r in read_manifest(tmp_path / "c")} != {r["coco_image_id"] for r in rows}


def test_coco_subset_fails_clearly_when_a_class_is_short(coco, tmp_path, capsys):
    base, _ = coco
    argv = ["coco-subset", "--annotations", str(base / "instances.json"), "--images", str(base / "images"),
            "--classes", ",".join(CHOSEN), "--per-class", "1000", "--size", "16", "--out", str(tmp_path / "out")]
    assert data_main(argv) == 2
    err = capsys.readouterr().err
    assert "--per-class 1000" in err and "airplane has" in err
    assert not (tmp_path / "out").exists()  # nothing written
    argv[argv.index("--classes") + 1] = "airplane,buss"
    assert data_main(argv) == 2 and "Did you mean 'bus'" in capsys.readouterr().err
    argv[argv.index("--classes") + 1] = "airplane,bus"
    argv[argv.index("--per-class") + 1] = "2"
    assert data_main(argv) == 0 and len(read_manifest(tmp_path / "out")) == 4
