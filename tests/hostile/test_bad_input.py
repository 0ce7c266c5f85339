"""Hostile input, part B (issue #17, items 10-21 and 23-26): bad input gets a clear error, no traceback.

Every case writes its hostile input itself and runs the real CLI (`python -m cnnlab`). The classes
of hostile input covered here:

- damaged archives: not a zip, an empty file, a truncated zip, a bad CRC, an encrypted member, an
  unknown compression method (`train` and `data check`)
- hostile image files: a decompression-bomb PNG header, a truncated JPEG, a text file named .jpg, a
  symlink to a non-image, images that are not square; a legal file name containing `::`
- hostile data sets: one class only; truncated MNIST .gz and a bad IDX header; a stream-loader worker
  meeting a damaged file
- hostile config values: bad `model.layers` values, unknown `data.options`, `train.device=cuda`
  without CUDA, an absurd `data.image_size`, infinite / NaN numbers, a validation split that rounds
  to nothing, duplicate YAML keys, a non-UTF-8 config, a folder given as the config, `~` in paths
- foreign or damaged checkpoints for `eval` and `--resume`: another model's weights, wrong types, a
  bad RNG state, NaN weights (the run's own files stay as they were)
- damaged run files for `report` and `compare` (history.csv, metrics.json, data.json), and a run
  without a test split in `compare`
- a full or unwritable cache disk (training goes on without the cache, with a warning)
- absurd shapes for `cnnlab summary --input`

Expected: exit 2 for bad input (1 where `data check` reports findings and for a refused checkpoint,
as for one holding code), a message naming the file,
key or value, no traceback, and no run folder left behind.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
LAYERS = [{"conv": {"out": 4, "k": 3, "padding": 1}}, "relu", {"maxpool": 2}, "flatten", {"linear": "classes"}]


def cnnlab(*args, cwd: Path, env: dict | None = None, timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    """The real command in a new process (`python -m cnnlab ...`)."""
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw)


@pytest.fixture
def main(capsys, monkeypatch):
    """`cnnlab.cli.main` in this process, as `python -m cnnlab` runs it (an interpreter start costs seconds
    on a busy 2-core machine; a case in the table takes a fraction of that): the same exit codes and
    output, and an exception that the CLI would show as a traceback fails the test."""
    from cnnlab import cli

    def run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def refused(r: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == code, f"exit {r.returncode}, expected {code}:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    for f in fragments:
        assert f in out, f"{f!r} not in the output:\n{out[-4000:]}"


def no_run_folder(runs: Path) -> None:
    assert not runs.exists() or sorted(p.name for p in runs.iterdir()) == [], sorted(runs.iterdir())


def write_images(root: Path, classes=("a", "b"), per_class: int = 6, size=(8, 8), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def write_config(folder: Path, name: str = "exp", **sections) -> Path:
    cfg = {"data": {"name": "folder", "val_split": 2},
           "model": {"name": "layers", "layers": LAYERS},
           "train": {"epochs": 1, "batch_size": 4, "progress": "off", "threads": 1},
           "output": {"dir": str(folder / "runs"), "report": False, "tensorboard": False}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------------------
# Damaged zips (item 10), for `train` and for `data check`


def _good_zip() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for c in ("a", "b"):
            for i in range(6):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, "PNG")
                z.writestr(f"train/{c}/{i}.png", png.getvalue())
    return buf.getvalue()


def _patch_first_member(data: bytes, local_at: int, central_at: int, value: bytes) -> bytes:
    b = bytearray(data)
    cd = b.find(b"PK\x01\x02")
    b[local_at:local_at + len(value)] = value  # the first local header starts at 0
    b[cd + central_at:cd + central_at + len(value)] = value
    return bytes(b)


def damaged_zip(kind: str) -> bytes:
    good = _good_zip()
    if kind == "not_a_zip":
        return b"these are my holiday notes, not a zip archive\n" * 20
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "bad_crc":  # a flipped byte inside the first member's (stored) data
        b = bytearray(good)
        name_len = int.from_bytes(b[26:28], "little")
        at = 30 + name_len + int.from_bytes(b[28:30], "little") + 40
        b[at] ^= 0xFF
        return bytes(b)
    if kind == "encrypted":  # general-purpose flag bit 0: "encrypted, password required"
        return _patch_first_member(good, 6, 8, b"\x01\x00")
    if kind == "unknown_compression":  # method 99 (AES), which zipfile cannot read
        return _patch_first_member(good, 8, 10, (99).to_bytes(2, "little"))
    raise AssertionError(kind)


WHOLE = ["not_a_zip", "empty", "truncated"]
MEMBER = ["bad_crc", "encrypted", "unknown_compression"]


@pytest.mark.parametrize("kind", WHOLE + MEMBER)
def test_damaged_zip_train(main, tmp_path, kind):
    z = tmp_path / "data.zip"
    z.write_bytes(damaged_zip(kind))
    r = main("train", write_config(tmp_path), f"data.root={z}", cwd=tmp_path)
    refused(r, 2, str(z), *(["train/a/0.png"] if kind in MEMBER else []))
    no_run_folder(tmp_path / "runs")


def test_damaged_zip_train_real_process(tmp_path):
    """One case of the table above through `python -m cnnlab` itself: exit code and stderr as a shell sees them."""
    z = tmp_path / "data.zip"
    z.write_bytes(damaged_zip("bad_crc"))
    r = cnnlab("train", write_config(tmp_path), f"data.root={z}", cwd=tmp_path)
    refused(r, 2, f"{z}::train/a/0.png")
    no_run_folder(tmp_path / "runs")


@pytest.mark.parametrize("kind", WHOLE + MEMBER)
def test_damaged_zip_data_check(main, tmp_path, kind):
    z = tmp_path / "data.zip"
    z.write_bytes(damaged_zip(kind))
    r = main("data", "check", z, "--jobs", "1", cwd=tmp_path)
    if kind in WHOLE:
        refused(r, 2, str(z))
    else:  # the archive opens: the damaged member is a finding, the other eleven are fine
        refused(r, 1, "train/a/0.png", "1 errors")


# ----------------------------------------------------------------------------------------------
# Hostile image files in a folder (items 11, 19, 20) and non-square images (item 12)


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header then claims 20000 x 20000 pixels (400 M, over Pillow's limit)."""
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")  # IHDR's CRC over type + data
    return bytes(b)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) * 6 // 10]


@pytest.mark.parametrize("kind,name", [("bomb", "bomb.png"), ("truncated_jpeg", "cut.jpg"),
                                       ("text_as_jpg", "notes.jpg"), ("symlink", "link.png")])
def test_hostile_image_file_is_named(main, tmp_path, kind, name):
    root = write_images(tmp_path / "ds")
    bad = root / "a" / name
    if kind == "bomb":
        bad.write_bytes(_bomb_png())
    elif kind == "truncated_jpeg":
        bad.write_bytes(_truncated_jpeg())
    elif kind == "text_as_jpg":
        bad.write_text("these are my notes, not an image\n")
    else:
        (tmp_path / "readme.txt").write_text("not an image at all\n")
        bad.symlink_to(tmp_path / "readme.txt")
    r = main("train", write_config(tmp_path), f"data.root={root}", cwd=tmp_path)
    refused(r, 2, str(bad))
    no_run_folder(tmp_path / "runs")


def test_file_name_with_double_colon_trains(main, tmp_path):
    root = write_images(tmp_path / "ds")
    (root / "a" / "0.png").rename(root / "a" / "shot::0.png")  # a legal file name on Linux and macOS
    r = main("train", write_config(tmp_path), f"data.root={root}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = np.load(next((tmp_path / "runs").iterdir()) / "splits.npz")
    assert any("shot::0.png" in i for k in ("train_ids", "val_ids") for i in ids[k])


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_non_square_images_without_image_size(main, tmp_path, loader):
    root = write_images(tmp_path / "ds", size=(12, 8))
    r = main("train", write_config(tmp_path), f"data.root={root}", f"data.loader={loader}", cwd=tmp_path)
    refused(r, 2, "data.image_size", "12x8")
    no_run_folder(tmp_path / "runs")


def test_stream_worker_error_names_the_file(main, tmp_path):
    root = write_images(tmp_path / "ds")
    bad = root / "a" / "notes.png"
    bad.write_text("not a png\n")
    r = main("train", write_config(tmp_path), f"data.root={root}", "data.loader=stream", "data.num_workers=1",
               "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "train.batch_size=2", cwd=tmp_path)
    refused(r, 2, str(bad))


def test_one_class_data_set_is_refused(main, tmp_path):
    root = write_images(tmp_path / "ds", classes=("only",))
    r = main("train", write_config(tmp_path), f"data.root={root}", cwd=tmp_path)
    refused(r, 2, "1 class", "only")
    no_run_folder(tmp_path / "runs")


# ----------------------------------------------------------------------------------------------
# Hostile config values (items 13, 21, 25)

BAD_VALUES = [
    (["model.layers=[{conv: [1, 2]}, flatten, {linear: classes}]"], ["model.layers[0]", "[1, 2]"]),
    (["model.layers=[{conv: {out: -5}}, flatten, {linear: classes}]"], ["model.layers[0]", "-5"]),
    (["model.layers=[{conv: {out: 4, k: x}}, flatten, {linear: classes}]"], ["model.layers[0]", "'x'"]),
    (["data.options.foo=1"], ["data.options", "foo"]),
    (["data.image_size=100000"], ["data.image_size", "100000"]),
    (["optim.lr=.inf"], ["optim.lr", "inf"]),
    (["schedule.min_lr=.nan"], ["schedule.min_lr", "nan"]),
    (["data.val_split=0.0001"], ["data.val_split", "0.0001"]),
]
if not torch.cuda.is_available():
    BAD_VALUES.append((["train.device=cuda"], ["train.device", "CUDA"]))


@pytest.mark.parametrize("overrides,fragments", BAD_VALUES, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_bad_config_value_is_refused_before_work(main, tmp_path, overrides, fragments):
    cfg = write_config(tmp_path, data={"name": "digits", "val_split": 0.1})
    r = main("train", cfg, *overrides, cwd=tmp_path)
    refused(r, 2, *fragments)
    no_run_folder(tmp_path / "runs")


@pytest.mark.parametrize("budget", ["6G", "-1", "nan"])
def test_bad_memory_budget_is_refused_when_read(main, tmp_path, budget):
    """CNNLAB_MEMORY_BUDGET is read when data is opened (it was read at import: a bad value was a traceback
    from `import cnnlab`, and a value set after the import was never seen)."""
    cfg = write_config(tmp_path, data={"name": "digits", "val_split": 0.1})
    refused(main("train", cfg, cwd=tmp_path, env={"CNNLAB_MEMORY_BUDGET": budget}), 2, "CNNLAB_MEMORY_BUDGET",
            repr(budget))
    no_run_folder(tmp_path / "runs")


def test_memory_budget_is_read_when_data_is_opened(monkeypatch, tmp_path):
    from cnnlab.config import DataConfig
    from cnnlab.data import pipeline

    d = DataConfig(name="folder", root=str(write_images(tmp_path / "imgs")), val_split=2)
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNNLAB_MEMORY_BUDGET", "0")  # set after the import: the folder streams from disk
    assert pipeline.memory_budget() == 0
    assert pipeline.prepare(d).train.images is None
    monkeypatch.delenv("CNNLAB_MEMORY_BUDGET")
    assert pipeline.prepare(d).train.images is not None


def test_duplicate_yaml_keys_are_refused(main, tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("data:\n  name: digits\noptim:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n")
    r = main("train", cfg, cwd=tmp_path)
    refused(r, 2, str(cfg), "'lr'", "line 6")
    no_run_folder(tmp_path / "runs")


def test_non_utf8_config_names_the_file(main, tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("data:\n  name: digits  # café\n".encode("latin-1"))
    refused(main("train", cfg, cwd=tmp_path), 2, str(cfg), "UTF-8")


def test_folder_given_as_config(main, tmp_path):
    (tmp_path / "exp").mkdir()
    r = main("train", tmp_path / "exp", cwd=tmp_path)
    refused(r, 2, str(tmp_path / "exp"), "is a folder")


def test_tilde_in_paths_is_the_home_folder(main, tmp_path):
    home = tmp_path / "home"
    write_images(home / "ds")
    cfg = write_config(tmp_path, output={"dir": "~/myruns"})
    r = main("train", cfg, "data.root=~/ds", cwd=tmp_path, env={"HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "~").exists()
    assert (home / "myruns" / "exp" / "metrics.json").is_file()


def test_summary_of_an_absurd_input_is_refused(tmp_path):
    def limit_memory():  # the unfixed code tried to allocate 120 GB: keep a regression from hurting the machine
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    r = cnnlab("summary", "cifar_convnet", "--input", "3x100000x100000", cwd=tmp_path, preexec_fn=limit_memory)
    refused(r, 2, "--input", "3x100000x100000")


# ----------------------------------------------------------------------------------------------
# Truncated MNIST .gz and a bad IDX header (item 17)


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


@pytest.mark.parametrize("damage", ["truncated_gz", "bad_header"])
def test_damaged_mnist_files(main, tmp_path, damage):
    root = tmp_path / "mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
             "train-labels-idx1-ubyte": np.arange(20, dtype=np.uint8) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
             "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8)}
    for name, arr in files.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(_idx(arr)))
    bad = root / "train-images-idx3-ubyte.gz"
    if damage == "truncated_gz":
        bad.write_bytes(bad.read_bytes()[:200])
    else:  # says 3 dimensions but stops after the first
        bad.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + (20).to_bytes(4, "big")))
    r = main("train", write_config(tmp_path), "data.name=mnist", f"data.root={root}", "data.download=false",
               cwd=tmp_path)
    refused(r, 2, str(bad))
    no_run_folder(tmp_path / "runs")


# ----------------------------------------------------------------------------------------------
# A full or unwritable cache disk (item 15)


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))


@pytest.mark.parametrize("how", ["full", "unwritable"])
def test_cache_disk_failure_trains_without_the_cache(main, tmp_path, how):
    root = write_images(tmp_path / "ds", per_class=60, size=(16, 16))  # 120 x 768 B decoded > the 64 kB limit
    cache = tmp_path / "cache"
    if how == "unwritable":
        cache.write_text("a file where the cache folder should be\n")
    cfg = write_config(tmp_path, train={"batch_size": 32})
    if how == "full":  # a file size limit is the process's own: a real process
        r = cnnlab("train", cfg, f"data.root={root}", cwd=tmp_path, env={"CNNLAB_CACHE": str(cache)},
                   preexec_fn=_file_size_limit)
    else:
        r = main("train", cfg, f"data.root={root}", cwd=tmp_path, env={"CNNLAB_CACHE": str(cache)})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "warning" in r.stderr and "cache" in r.stderr and str(cache) in r.stderr, r.stderr
    assert (tmp_path / "runs" / "exp" / "metrics.json").is_file()
    if how == "full":
        entries = sorted(p.name for p in (cache / "decoded").iterdir())
        assert len(entries) == 1 and entries[0].endswith(".pt"), entries  # the small val split's; no temp file
        r = main("train", cfg, f"data.root={root}", cwd=tmp_path, env={"CNNLAB_CACHE": str(cache)})
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]  # a later run caches fine
        assert len(list((cache / "decoded").iterdir())) == 2


# ----------------------------------------------------------------------------------------------
# Foreign or damaged checkpoints (item 14) and damaged run files (item 18), on one finished run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run on digits with a test split, and one without (for compare)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp, data={"name": "digits", "val_split": 0.15, "test_split": 0.2})
    from cnnlab import cli

    for name, extra in (("run", []), ("notest", ["data.test_split=null"])):
        assert cli.main(["train", str(cfg), f"output.name={name}", *extra]) == 0
    return tmp / "runs"


def _copy(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(finished / name, tmp_path / name))


def _foreign_model(c: dict) -> None:
    c["model"] = torch.nn.Sequential(torch.nn.Linear(3, 2)).state_dict()


def _wrong_types(c: dict) -> None:
    c["model"] = {k: "not a tensor" for k in c["model"]}
    c["state"] = "epoch three"


def _bad_rng(c: dict) -> None:
    c["rng"] = {"python": 1, "torch": torch.zeros(3)}


def _nan_weights(c: dict) -> None:
    c["model"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in c["model"].items()}


CHECKPOINT_DAMAGE = {"foreign_model": _foreign_model, "wrong_types": _wrong_types, "bad_rng": _bad_rng,
                     "nan_weights": _nan_weights}


@pytest.mark.parametrize("command,damage", [("eval", "foreign_model"), ("eval", "wrong_types"),
                                            ("eval", "nan_weights"), ("resume", "foreign_model"),
                                            ("resume", "wrong_types"), ("resume", "bad_rng")])
def test_damaged_checkpoint_is_refused_and_nothing_is_lost(main, finished, tmp_path, command, damage):
    run = _copy(finished, tmp_path)
    which = run / "checkpoints" / ("best.pt" if command == "eval" else "last.pt")
    c = torch.load(which, weights_only=True)
    CHECKPOINT_DAMAGE[damage](c)
    torch.save(c, which)
    kept = ["history.csv", "steps.csv", "metrics.json", "predictions.csv", "data.json", "checkpoints/best.pt",
            "checkpoints/last.pt"] + (["config.yaml"] if command == "eval" else [])  # resume records epochs=2
    before = {k: (run / k).read_bytes() for k in kept}
    args = ["eval", run] if command == "eval" else ["train", "--resume", run, "train.epochs=2"]  # 1 more epoch
    r = main(*args, cwd=tmp_path)
    refused(r, 1, str(which))  # a refused checkpoint exits 1, as one holding code does
    assert {k: (run / k).read_bytes() for k in kept} == before
    assert not (run / "evals").exists() or list((run / "evals").iterdir()) == []


def _garbage_history(run: Path) -> Path:
    (run / "history.csv").write_bytes(b"epoch,train_loss\n1,\xff\xfe not a number\n2")
    return run / "history.csv"


def _cut_metrics(run: Path) -> Path:
    p = run / "metrics.json"
    p.write_text(p.read_text()[:40])
    return p


def _list_data_json(run: Path) -> Path:
    (run / "data.json").write_text("[1, 2, 3]\n")
    return run / "data.json"


def _metrics_without_test(run: Path) -> Path:
    p = run / "metrics.json"
    m = json.loads(p.read_text())
    del m["test"]
    p.write_text(json.dumps(m))
    return p


RUN_FILE_DAMAGE = {"history.csv": _garbage_history, "metrics.json": _cut_metrics, "data.json": _list_data_json,
                   "no_test_results": _metrics_without_test}


@pytest.mark.parametrize("command,damage", [("report", "history.csv"), ("report", "metrics.json"),
                                            ("report", "data.json"), ("compare", "history.csv"),
                                            ("compare", "metrics.json"), ("compare", "no_test_results")])
# (compare reads no data.json; report draws a metrics.json without test results from the saved logits)
def test_damaged_run_file_is_named(main, finished, tmp_path, command, damage):
    run = _copy(finished, tmp_path)
    other = _copy(finished, tmp_path, "notest")
    bad = RUN_FILE_DAMAGE[damage](run)
    r = main(*([command, run] if command == "report" else ["compare", run, other]), cwd=tmp_path)
    refused(r, 2, str(bad), *(["'test'"] if damage == "no_test_results" else []))


def test_compare_a_run_without_test_split(main, finished, tmp_path):
    run, other = _copy(finished, tmp_path), _copy(finished, tmp_path, "notest")
    r = main("compare", run, other, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
