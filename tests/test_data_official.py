"""Official data sets read from files written here in each release's exact on-disk format (no network)."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import DATASETS, official
from cnnlab.data import download as dl

REAL_SYSTEM_DIR = official.SYSTEM_DIR
OFFICIAL = ["mnist", "fashion-mnist", "cifar10", "cifar100", "stl10", "svhn", "mnist-m"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, no system or user cache: only what each test writes."""
    def no_network(url, dest):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(dl, "_fetch", no_network)
    monkeypatch.setattr(official, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))


def serve(monkeypatch, files: dict[str, Path]) -> None:
    """Downloads of these URLs copy local files instead."""
    monkeypatch.setattr(dl, "_fetch", lambda url, dest: shutil.copyfile(files[url], dest))


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Writers of the official formats


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    """IDX as LeCun's files: magic 0 0 0x08 ndim, big-endian dims, then the data."""
    arr = np.asarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle did for CIFAR: str as BINSTRING, numpy.core globals."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(raw)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_bytes


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(folder: Path, n: int = 4) -> dict:
    """cifar-10-batches-py/ as in the official tarball: 5 data batches, test_batch, batches.meta."""
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    truth = {}
    for i, f in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = cifar_images(n, i), [(i + j) % 10 for j in range(n)]
        truth[f] = (x, y)
        (d / f).write_bytes(py2_pickle({"batch_label": f"batch {i}", "labels": y, "data": x,
                                        "filenames": [f"img_{i}_{j}.png" for j in range(n)]}))
    (d / "batches.meta").write_bytes(py2_pickle({"num_cases_per_batch": n, "label_names": names, "num_vis": 3072}))
    (d / "readme.html").write_text("<html></html>")
    return truth


def tar_folder(src: Path, name: str, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src / name, arcname=name)
    return out


# ----------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    x_tr, y_tr = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    x_te, y_te = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    for f, a in [("train-images-idx3-ubyte", x_tr), ("train-labels-idx1-ubyte", y_tr),
                 ("t10k-images-idx3-ubyte", x_te), ("t10k-labels-idx1-ubyte", y_te)]:
        write_idx(root / (f + (".gz" if gz else "")), a, gz=gz)
    src = DATASETS.get("mnist")(str(root), download=False)
    assert src.train.images.shape == (7, 1, 28, 28) and src.train.images.dtype == torch.uint8
    assert np.array_equal(src.train.images[:, 0].numpy(), x_tr) and np.array_equal(src.train.labels, y_tr)
    assert np.array_equal(src.test.images[:, 0].numpy(), x_te) and src.classes == [str(i) for i in range(10)]
    assert "repackaged copy" in src.description  # not the published bytes, so the description says so


def test_idx_truncated_file_is_refused(tmp_path):
    root = tmp_path / "m"
    write_idx(root / "t.gz", np.zeros((2, 28, 28)))
    raw = gzip.decompress((root / "t.gz").read_bytes())[:-5]
    (root / "t").write_bytes(raw)
    with pytest.raises(ValueError, match="truncated or damaged"):
        official.read_idx(root / "t")


def test_mnist_download_is_verified(tmp_path, monkeypatch):
    server = tmp_path / "server"
    arrays = {"train-images-idx3-ubyte": np.zeros((2, 28, 28)), "train-labels-idx1-ubyte": np.array([1, 2]),
              "t10k-images-idx3-ubyte": np.ones((1, 28, 28)), "t10k-labels-idx1-ubyte": np.array([3])}
    files = {}
    for f, a in arrays.items():
        write_idx(server / (f + ".gz"), a)
        files[official.IDX_SETS["mnist"][0][0] + f + ".gz"] = server / (f + ".gz")
    serve(monkeypatch, files)
    with pytest.raises(dl.ChecksumError, match="expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        DATASETS.get("mnist")(str(tmp_path / "root"), download=True)  # our files are not the official ones
    mirrors, _, classes, tv = official.IDX_SETS["mnist"]
    monkeypatch.setitem(official.IDX_SETS, "mnist", (mirrors, [md5(server / (f + ".gz")) for f in arrays], classes, tv))
    src = DATASETS.get("mnist")(str(tmp_path / "root"), download=True)
    assert len(src.train) == 2 and len(src.test) == 1 and (tmp_path / "root" / "t10k-images-idx3-ubyte.gz").is_file()
    assert "the published .gz files" in src.description


def test_the_cache_folder_is_read_when_a_data_set_is_opened(tmp_path, monkeypatch):
    """$CNNLAB_CACHE set after cnnlab is imported still decides where a data set is looked for and goes."""
    for cache in (tmp_path / "one", tmp_path / "two"):
        monkeypatch.setenv("CNNLAB_CACHE", str(cache))
        n = 2 if cache.name == "one" else 3
        for f, a in [("train-images-idx3-ubyte", np.zeros((n, 28, 28))), ("train-labels-idx1-ubyte", np.arange(n)),
                     ("t10k-images-idx3-ubyte", np.ones((1, 28, 28))), ("t10k-labels-idx1-ubyte", np.array([3]))]:
            write_idx(cache / "mnist" / (f + ".gz"), a)
        assert len(DATASETS.get("mnist")(None, download=False).train) == n
        with pytest.raises(FileNotFoundError, match=str(cache / "cifar10")):  # and named when missing
            DATASETS.get("cifar10")(None, download=False)


def test_fashion_mnist_from_system_package(monkeypatch):
    if not (REAL_SYSTEM_DIR / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(official, "SYSTEM_DIR", REAL_SYSTEM_DIR)
    src = DATASETS.get("fashion-mnist")(None, download=False)  # the no-network fixture is still active
    assert src.train.images.shape == (60000, 1, 28, 28) and src.test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(src.train.labels).tolist() == [6000] * 10
    assert src.classes[9] == "Ankle boot" and src.test.labels[:4].tolist() == [9, 2, 1, 1]


# ----------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_python_release(tmp_path):
    truth = write_cifar10(tmp_path / "root")
    src = DATASETS.get("cifar10")(str(tmp_path / "root"), download=False)
    assert src.train.images.shape == (20, 3, 32, 32) and src.test.images.shape == (4, 3, 32, 32)
    assert src.classes[0] == "airplane" and src.classes[9] == "truck"
    x, y = truth["data_batch_2"]
    img = src.train.images[4 + 1].numpy()  # second image of batch 2
    c, r, col = 2, 5, 17  # rows hold 1024 R, then 1024 G, then 1024 B values, each row-major 32x32
    assert img[c, r, col] == x[1, c * 1024 + r * 32 + col]
    assert src.train.labels[5] == y[1] and src.test.labels.tolist() == truth["test_batch"][1]


def test_cifar10_downloaded_tarball_is_verified_then_extracted(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "build")
    tgz = tar_folder(tmp_path / "build", "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    url = official.CIFAR["cifar10"]["url"]
    # one byte changed on the way: refused, nothing extracted
    bad = tmp_path / "bad.tar.gz"
    data = bytearray(tgz.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    serve(monkeypatch, {url: bad})
    monkeypatch.setitem(official.CIFAR["cifar10"], "md5", md5(tgz))
    with pytest.raises(dl.ChecksumError) as e:
        DATASETS.get("cifar10")(str(tmp_path / "root"), download=True)
    assert md5(tgz) in str(e.value) and md5(bad) in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
    assert not (tmp_path / "root" / "cifar-10-batches-py").exists()
    # the right bytes: verified, extracted, read
    serve(monkeypatch, {url: tgz})
    src = DATASETS.get("cifar10")(str(tmp_path / "root"), download=True)
    assert len(src.train) == 20 and (tmp_path / "root" / "cifar-10-batches-py" / "test_batch").is_file()


def test_local_tarball_with_wrong_checksum_is_not_extracted(tmp_path):
    write_cifar10(tmp_path / "build")
    root = tmp_path / "root"
    root.mkdir()
    tar_folder(tmp_path / "build", "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    with pytest.raises(dl.ChecksumError, match="c58f30108f718f92721af3b95e74349a"):
        DATASETS.get("cifar10")(str(root), download=False)
    assert not (root / "cifar-10-batches-py").exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_cifar_pickle_with_payload_never_runs(tmp_path):
    write_cifar10(tmp_path / "root")
    sentinel = tmp_path / "sentinel"
    evil = {"labels": [0], "data": np.zeros((1, 3072), np.uint8), "hook": _Payload(sentinel)}
    (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="data_batch_3.*posix.system|data_batch_3.*system"):
        DATASETS.get("cifar10")(str(tmp_path / "root"), download=False)
    assert not sentinel.exists()


def test_cifar100_fine_and_coarse(tmp_path):
    d = tmp_path / "root" / "cifar-100-python"
    d.mkdir(parents=True)
    for split, n in [("train", 6), ("test", 2)]:
        (d / split).write_bytes(py2_pickle({"filenames": ["a"] * n, "batch_label": split, "data": cifar_images(n, n),
                                           "fine_labels": list(range(90, 90 + n)), "coarse_labels": [19] * n}))
    (d / "meta").write_bytes(py2_pickle({"fine_label_names": [f"f{i}" for i in range(100)],
                                         "coarse_label_names": [f"c{i}" for i in range(20)]}))
    fine = DATASETS.get("cifar100")(str(tmp_path / "root"), download=False)
    assert len(fine.classes) == 100 and fine.train.labels.tolist() == list(range(90, 96))
    coarse = DATASETS.get("cifar100")(str(tmp_path / "root"), download=False, label="coarse")
    assert len(coarse.classes) == 20 and set(coarse.test.labels.tolist()) == {19}


# ----------------------------------------------------------------------------------------------
# STL-10, SVHN, MNIST-M


def write_stl10(root: Path, n_train=12, n_test=4, n_unl=3) -> dict:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    imgs = {}
    for split, n in [("train", n_train), ("test", n_test), ("unlabeled", n_unl)]:
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W) as we expect to read it
        imgs[split] = x
        # official layout: per image, per channel, column-major (all rows of column 0, then column 1...)
        raw = bytearray(n * 3 * 96 * 96)
        for i in range(n):
            for c in range(3):
                for col in range(96):
                    off = ((i * 3 + c) * 96 + col) * 96
                    raw[off:off + 96] = x[i, c, :, col].tobytes()
        (d / f"{split}_X.bin").write_bytes(bytes(raw))
    for split, n in [("train", n_train), ("test", n_test)]:
        (d / f"{split}_y.bin").write_bytes(bytes((np.arange(n) % 10 + 1).astype(np.uint8)))  # labels 1..10
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    (d / "fold_indices.txt").write_text("".join(" ".join(str((k + j) % n_train) for j in range(3)) + " \n"
                                                for k in range(10)))
    return imgs


def test_stl10_binaries(tmp_path):
    imgs = write_stl10(tmp_path / "root")
    src = DATASETS.get("stl10")(str(tmp_path / "root"), download=False)
    assert src.train.images.shape == (12, 3, 96, 96) and np.array_equal(src.train.images.numpy(), imgs["train"])
    assert np.array_equal(src.test.images.numpy(), imgs["test"]) and src.train.labels[:3].tolist() == [0, 1, 2]
    assert src.classes[7] == "monkey" and src.unlabeled is None
    f3 = DATASETS.get("stl10")(str(tmp_path / "root"), download=False, fold=3, unlabeled=True)
    assert f3.train.labels.tolist() == [3, 4, 5] and np.array_equal(f3.train.images.numpy(), imgs["train"][3:6])
    assert np.array_equal(f3.unlabeled.images.numpy(), imgs["unlabeled"]) and set(f3.unlabeled.labels) == {-1}
    with pytest.raises(ValueError, match="fold=10"):
        DATASETS.get("stl10")(str(tmp_path / "root"), download=False, fold=10)
    with pytest.raises(ValueError, match="unknown key 'folds'"):
        DATASETS.get("stl10")(str(tmp_path / "root"), download=False, folds=1)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "root"
    root.mkdir()
    rng = np.random.default_rng(2)
    truth = {}
    for split, n in [("train", 5), ("test", 3)]:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (row, col, channel, N) as in the .mat files
        y = np.array([[10], [1], [2], [9], [10]][:n], dtype=np.uint8)  # 10 = digit 0
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        truth[split] = x
    src = DATASETS.get("svhn")(str(root), download=False)
    assert src.train.images.shape == (5, 3, 32, 32) and src.train.labels.tolist() == [0, 1, 2, 9, 0]
    assert src.train.images[3, 1, 4, 20] == truth["train"][4, 20, 1, 3]


def _digits_rgb(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)


def test_mnist_m_original_release(tmp_path):
    root = tmp_path / "root" / "mnist_m"
    for split, n in [("train", 4), ("test", 2)]:
        (root / f"mnist_m_{split}").mkdir(parents=True)
        lines = []
        for i, img in enumerate(_digits_rgb(n, n)):
            Image.fromarray(img).save(root / f"mnist_m_{split}" / f"{i:08d}.png")
            lines.append(f"{i:08d}.png {(i * 3) % 10}")
        (root / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines) + "\n")
    src = DATASETS.get("mnist-m")(str(tmp_path / "root"), download=False)
    assert src.train.files is not None and len(src.train) == 4 and src.train.labels.tolist() == [0, 3, 6, 9]
    assert src.test.files[1].endswith("mnist_m_test/00000001.png")
    from cnnlab.data.base import decode
    assert np.array_equal(decode(src.train.files[2], 3, None).permute(1, 2, 0).numpy(), _digits_rgb(4, 4)[2])


def test_mnist_m_pytorch_release_and_download(tmp_path, monkeypatch):
    build = tmp_path / "build"
    build.mkdir()
    truth = {}
    for split, n in [("train", 5), ("test", 2)]:
        x, y = torch.from_numpy(_digits_rgb(n, n)), torch.arange(n) % 10
        truth[split] = x
        torch.save((x, y), build / f"mnist_m_{split}.pt")
    src = DATASETS.get("mnist-m")(str(build), download=False)
    assert src.train.images.shape == (5, 3, 28, 28) and torch.equal(src.train.images.permute(0, 2, 3, 1), truth["train"])
    # the download path: two verified tarballs, as github.com/liyxi/mnist-m publishes them
    files, pairs = {}, []
    for (url, _), split in zip(official.MNIST_M_PT, ["train", "test"]):
        tgz = tar_folder(build, f"mnist_m_{split}.pt", tmp_path / url.rsplit("/", 1)[-1])
        files[url] = tgz
        pairs.append((url, md5(tgz)))
    serve(monkeypatch, files)
    monkeypatch.setattr(official, "MNIST_M_PT", pairs)
    got = DATASETS.get("mnist-m")(str(tmp_path / "dl"), download=True)
    assert len(got.train) == 5 and len(got.test) == 2


def test_mnist_m_pt_refuses_pickled_code(tmp_path):
    sentinel = tmp_path / "sentinel"
    torch.save((_Payload(sentinel), torch.zeros(1)), tmp_path / "mnist_m_train.pt")
    torch.save((torch.zeros(1, 28, 28, 3, dtype=torch.uint8), torch.zeros(1)), tmp_path / "mnist_m_test.pt")
    with pytest.raises(pickle.UnpicklingError):
        DATASETS.get("mnist-m")(str(tmp_path), download=False)
    assert not sentinel.exists()


@pytest.mark.parametrize("name", OFFICIAL)
def test_missing_files_say_where_and_how(tmp_path, name):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        DATASETS.get(name)(str(root), download=False)
    msg = str(e.value)
    assert str(root) in msg and "download" in msg and str(official.SYSTEM_DIR / name) in msg
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in msg
