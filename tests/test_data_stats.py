"""Statistics are exact over every pixel (one pass, any number of processes) and right on CIFAR-10."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import DATASETS, ImageSet
from cnnlab.data.cli import main as data_main
from cnnlab.data.stats import compute_stats

ZIP_NAME = "cifar10-jpeg-train.zip"  # CI keeps it at ../shared/datasets relative to the repo root
CIFAR_ZIP = next((p for p in [Path(__file__).resolve().parents[2] / "shared" / "datasets" / ZIP_NAME,
                              Path("/work/shared/datasets") / ZIP_NAME] if p.is_file()), None)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Images of different sizes, one palette and one RGBA, in three classes (one twice as big)."""
    root = tmp_path_factory.mktemp("stats") / "ds"
    rng = np.random.default_rng(3)
    arrays = []
    for c, n in [("a", 6), ("b", 3), ("c", 3)]:
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = (8, 8) if i % 2 else (12, 5)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
            arrays.append(arr)
    return root, arrays


def reference(arrays: list[np.ndarray]):
    """The textbook definition: mean and population std over the concatenation of every pixel."""
    allpix = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays]).astype(np.float64) / 255.0
    return allpix.mean(0), allpix.std(0)


def test_stats_equal_definition_over_all_pixels(mixed):
    root, arrays = mixed
    src = DATASETS.get("folder")(str(root))
    st = compute_stats(src.train, jobs=1)
    mean, std = reference(arrays)
    assert np.allclose(st.mean, mean, atol=1e-12) and np.allclose(st.std, std, atol=1e-12)
    # not the mean of per-image stds (which differs on such data)
    assert not np.allclose(st.std, np.mean([a.reshape(-1, 3).std(0) / 255 for a in arrays], 0), atol=1e-3)
    assert st.class_counts == {"a": 6, "b": 3, "c": 3} and st.n_images == 12
    assert st.sizes == {"5x12": 7, "8x8": 5} and st.modes == {"RGB": 12} and st.channels == 3
    assert st.n_pixels == 7 * 60 + 5 * 64
    # the same numbers from a process pool with small chunks, and from the decoded tensor path
    st2 = compute_stats(src.train, jobs=2, chunk=2)
    assert st2.mean == st.mean and st2.std == st.std and st2.sizes == st.sizes
    eight = [a for a in arrays if a.shape[0] == 8]
    mem = ImageSet(labels=np.zeros(len(eight)), classes=["x"],
                   images=torch.from_numpy(np.stack(eight)).permute(0, 3, 1, 2).contiguous())
    m, s = reference(eight)
    st3 = compute_stats(mem)
    assert np.allclose(st3.mean, m, atol=1e-12) and np.allclose(st3.std, s, atol=1e-12)


def test_stats_constant_and_grey_images(tmp_path):
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("L", (7, 7), 200).save(tmp_path / c / f"{i}.png")
    st = compute_stats(DATASETS.get("folder")(str(tmp_path)).train, jobs=1)
    assert st.channels == 1 and st.mean == (200 / 255,) and st.std == (0.0,) and st.modes == {"L": 6}
    (tmp_path / "x" / "bad.png").write_bytes(b"not a png")
    st = compute_stats(DATASETS.get("folder")(str(tmp_path)).train, jobs=1)
    assert len(st.unreadable) == 1 and "bad.png" in st.unreadable[0] and st.n_images == 6


def test_stats_of_a_big_uint8_tensor_have_no_cancellation():
    # 2^24 pixels all 255 but one: float32 sums of squares would lose this; exact integers do not
    x = torch.full((64, 1, 512, 512), 255, dtype=torch.uint8)
    x[0, 0, 0, 0] = 0
    st = compute_stats(ImageSet(labels=np.zeros(64), classes=["a"], images=x))
    n = x.numel()
    p = 1 / n
    assert st.std[0] == pytest.approx(np.sqrt(p * (1 - p)), rel=1e-9)


def test_stats_cli_on_name_and_path(mixed, capsys):
    root, _ = mixed
    assert data_main(["stats", "digits"]) == 0
    out = capsys.readouterr().out
    assert "images   1,797" in out and "8x8 1797" in out
    assert data_main(["stats", str(root), "--json", "--jobs", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_images"] == 12 and len(d["mean"]) == 3
    assert data_main(["stats", "cifar-10"]) == 2  # unknown name: "did you mean"
    assert "cifar10" in capsys.readouterr().err


@pytest.mark.skipif(CIFAR_ZIP is None, reason="cifar10-jpeg-train.zip not available")
def test_cifar10_zip_stats():
    src = DATASETS.get("folder")(str(CIFAR_ZIP))
    st = compute_stats(src.train)
    assert st.n_images == 50000 and set(st.class_counts.values()) == {5000}
    assert np.allclose(st.mean, (0.491, 0.482, 0.447), atol=0.005), st.mean
    assert np.allclose(st.std, (0.247, 0.243, 0.262), atol=0.005), st.std
    assert st.sizes == {"32x32": 50000}
