"""Splits are seeded, stratified and disjoint; folder data sets read from folders and zips; loaders agree."""
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import config as C
from cnnlab.data.pipeline import carve, prepare
from cnnlab.data.stats import channel_stats, compute_stats


def _folder(root, classes=("cat", "dog", "frog"), n=12, size=10, split=None):
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / (split or "") / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def test_carve_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), 40)
    keep, held = carve(labels, 0.2, seed=3, what="val_split")
    assert len(held) == 40 and not set(keep) & set(held) and len(keep) + len(held) == 200
    assert np.all(np.bincount(labels[held]) == 8)  # stratified
    assert np.array_equal(carve(labels, 0.2, seed=3, what="v")[1], held)
    assert not np.array_equal(carve(labels, 0.2, seed=4, what="v")[1], held)
    keep, held = carve(labels, 25, seed=0, what="val_split")  # a count
    assert len(held) == 25


def test_digits_splits_are_disjoint_and_saved(tmp_path):
    cfg = C.load(None, ["data.name=digits", "data.val_split=0.1", "data.test_split=0.2"])
    s = prepare(cfg.data)
    ids = [set(x.ids) for x in (s.train, s.val, s.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 1797
    assert s.train.images.shape[1:] == (1, 8, 8) and s.eval_split == "test"
    # training-split statistics, not the whole set's
    mean, std = channel_stats(s.train.images)
    assert s.mean == mean and s.std == std


def test_channel_stats_equal_numpy():
    x = torch.randint(0, 256, (50, 3, 7, 5), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=7)
    a = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, a.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std, a.std(axis=(0, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("dtype", [">u2", "<u2"])  # Pillow opens these TIFFs as I;16B and I;16
def test_16_bit_grey_images_are_grey_everywhere(tmp_path, dtype):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 65536, (8, 8)).astype(dtype)).save(tmp_path / c / f"{i}.tif")
    mode = Image.open(tmp_path / "a" / "0.tif").mode
    assert mode == ("I;16B" if dtype == ">u2" else "I;16")
    cfg = C.load(None, ["data.name=folder", f"data.root={tmp_path}", "data.val_split=2"])
    for memory in (True, False):  # decoded up front, and streamed (mean/std computed from the files)
        s = prepare(cfg.data, want_memory=memory)
        assert s.channels == 1 and len(s.mean) == 1, (mode, memory, s.channels)
    st = compute_stats(s.train, jobs=1)  # `cnnlab data stats` says the same
    assert st.channels == 1 and st.modes == {mode: len(s.train)}
    assert st.mean == pytest.approx(s.mean, abs=1e-6) and st.std == pytest.approx(s.std, abs=1e-6)


def test_folder_and_zip_give_the_same_data(tmp_path):
    root = _folder(tmp_path / "imgs")
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(root.rglob("*.png")):
            zf.write(f, "train/" + str(f.relative_to(root)))
    a = prepare(C.load(None, ["data.name=folder", f"data.root={root}", "data.val_split=6"]).data)
    b = prepare(C.load(None, ["data.name=folder", f"data.root={z}", "data.val_split=6"]).data)
    assert a.classes == b.classes == ["cat", "dog", "frog"]
    assert torch.equal(a.train.images, b.train.images) and a.mean == b.mean
    assert len(a.val) == 6 and np.all(np.bincount(a.val.labels) == 2)


def test_folder_split_layout_and_resize(tmp_path):
    root = tmp_path / "ds"
    _folder(root, split="train", n=6, size=12)
    _folder(root, split="val", n=2, size=12)
    _folder(root, split="test", n=3, size=12)
    s = prepare(C.load(None, ["data.name=folder", f"data.root={root}", "data.image_size=8"]).data)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 9)
    assert s.train.images.shape[1:] == (3, 8, 8)


def test_mixed_sizes_without_image_size_is_a_clear_error(tmp_path):
    root = _folder(tmp_path / "ds", n=4, size=10)
    Image.new("RGB", (13, 9)).save(root / "cat" / "odd.png")
    with pytest.raises(ValueError, match="odd.png.*data.image_size"):
        prepare(C.load(None, ["data.name=folder", f"data.root={root}", "data.val_split=3"]).data)


def test_stream_path_gives_the_same_batches_as_memory(tmp_path):
    from cnnlab.data.loader import Batches, epoch_order

    root = _folder(tmp_path / "ds", n=10)
    d = C.load(None, ["data.name=folder", f"data.root={root}", "data.val_split=6"]).data
    mem = prepare(d, want_memory=True)
    stream = prepare(d, want_memory=False)
    assert stream.train.files is not None and mem.train.images is not None
    assert mem.mean == pytest.approx(stream.mean, abs=1e-6)
    order = epoch_order(len(mem.train), seed=1, epoch=0)
    kw = dict(batch_size=7, device=torch.device("cpu"), channels=3, size=10)
    for (xa, ya, ia), (xb, yb, ib) in zip(Batches(mem.train, **kw).iterate(order), Batches(stream.train, **kw).iterate(order)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
