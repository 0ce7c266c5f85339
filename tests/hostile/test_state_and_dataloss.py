"""Hostile inputs, part A: state, data loss and resource exhaustion (issue #17 items 1-9, 22, 27-29).

Each test writes its hostile input itself and checks that cnnlab refuses it cleanly (exit code, the file,
key or member named) and that nothing already on disk is lost. Classes of hostile input covered here:

- study variation names that are not plain folder names (`..`, `.`, `a/b`): would delete output.dir
- study run paths that land on folders cnnlab did not make: would be replaced by run folders
- `cnnlab report` pointed at a folder that is not a run folder: would delete its plots, overwrite report.*
- a data set changed behind the decoded cache (one file replaced): would train on stale pixels
- a corrupted decoded-cache entry (noise, all-0xFF bytes, wrong shape, wrong type): would train on garbage
- `--resume` after the data set changed: would re-split silently and train on validation images
- a zip bomb (a member with a huge size or compression ratio), in `train` and `data check`
- a YAML alias bomb (and a self-referring alias) in a config file
- two `cnnlab train --resume` of one run at the same time: would write every epoch twice
- overrides given with `--resume`: were ignored silently; now applied when safe, else refused by name
- runs that fail once their folder exists (device, model, weights): would leave an empty run folder
- the thread count a run used (results depend on it), recorded in env.json
- Ray clusters with GPUs: trials must be given one, not trained on the CPU
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cnnlab import cli
from cnnlab import config as C

TINY = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2},
    "model": {"name": "layers", "layers": ["flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 1, "batch_size": 128, "progress": "off", "threads": 1},
    "output": {"report": False},
}


def write_config(folder: Path, name: str = "tiny", **sections) -> Path:
    tree = json.loads(json.dumps(TINY))
    tree["output"]["dir"] = str(folder / "runs")
    for k, v in sections.items():
        tree[k] = {**tree[k], **v} if isinstance(tree.get(k), dict) and isinstance(v, dict) else v
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def cnnlab(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def epochs_of(run_dir: Path) -> list[int]:
    with open(run_dir / "history.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def image_tree(root: Path, n_per_class: int = 20, classes=("a", "b"), size: int = 8, seed: int = 0) -> list[Path]:
    """root/<class>/NNN.png, grey noise images, different per file."""
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            p = root / c / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(p)
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# YAML alias bomb (item 8)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    levels = "\n".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10))
    bomb = tmp_path / "bomb.yaml"  # 9 ** 9 = 387 million strings once written out, in ~600 bytes
    bomb.write_text(f"variations:\n  l0: &l0 {{model.dropout: 0.1}}\n" + "\n".join(
        "  " + line for line in levels.splitlines()) + "\nmodel: {options: {x: *l9}}\n")
    assert len(bomb.read_bytes()) < 1000
    for args in (["train", bomb], ["train", bomb, "--print-config"]):
        r = cnnlab(*args, timeout=90)  # it hung (and printed 22 MB) before
        assert r.returncode == 2, r.stderr[-2000:]
        assert str(bomb) in r.stderr and "alias" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stdout) < 10_000
    loop = tmp_path / "loop.yaml"
    loop.write_text("model: {options: &a {x: *a}}\n")
    with pytest.raises(C.ConfigError, match="alias"):
        C.load(loop)


# ----------------------------------------------------------------------------------------------
# Zip bomb (item 7)


def bomb_zip(tmp_path: Path) -> tuple[Path, str]:
    """A zip of real PNGs in two class folders plus one 'image' that unpacks 64 KB into 64 MB."""
    tree = tmp_path / "tree"
    image_tree(tree, n_per_class=6)
    archive, member = tmp_path / "bomb.zip", "train/b/zz-bomb.png"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(tree.rglob("*.png")):
            zf.write(p, f"train/{p.relative_to(tree)}")
        with zf.open(member, "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(64):
                f.write(block)
    assert archive.stat().st_size < 1 << 20
    return archive, member


def test_zip_bomb_is_refused_before_reading_in_train_and_data_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    archive, member = bomb_zip(tmp_path)
    cfg = write_config(tmp_path, data={"name": "folder", "root": str(archive), "val_split": 2, "test_split": None})
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{archive}::{member}" in err and "zip bomb" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    code = cli.main(["data", "check", str(archive)])
    out = capsys.readouterr()
    assert code != 0
    assert member in out.out + out.err and "zip bomb" in out.out + out.err


# ----------------------------------------------------------------------------------------------
# The decoded cache: stale pixels (item 4), corrupted entries (item 5)


def decoded_folder(tmp_path, monkeypatch, n_per_class=120):
    from cnnlab.data import DATASETS

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    image_tree(tmp_path / "imgs", n_per_class=n_per_class)
    files = DATASETS.get("folder")(str(tmp_path / "imgs")).train.files
    return files


def fresh_decode(files) -> torch.Tensor:
    from cnnlab.data.base import decode

    return torch.stack([decode(f, 1, None) for f in files])


def test_cache_sees_a_change_to_any_single_file(tmp_path, monkeypatch):
    from cnnlab.data.pipeline import decode_all

    files = decoded_folder(tmp_path, monkeypatch)  # 240 files: the old key looked at every 3rd one only
    assert torch.equal(decode_all(files, 1, None), fresh_decode(files))
    for i in (1, 2, 100, 200):  # each one file, each not looked at before
        Image.fromarray(np.full((8, 8), 17 * (i % 13), np.uint8), "L").save(files[i])
        got = decode_all(files, 1, None)
        assert int(got[i].float().mean()) == 17 * (i % 13)
        assert torch.equal(got, fresh_decode(files))


def test_cache_rebuilds_corrupted_entries(tmp_path, monkeypatch, capsys):
    from cnnlab.data.pipeline import decode_all

    files = decoded_folder(tmp_path, monkeypatch, n_per_class=40)
    want = fresh_decode(files)
    assert torch.equal(decode_all(files, 1, None), want)
    [entry] = (tmp_path / "cache").rglob("*.pt")
    good = entry.read_bytes()
    pixels = good.find(want.numpy().tobytes()[:64])  # where the pixels lie in the file
    assert pixels > 0

    def noise(b):  # flip bytes inside the pixel data
        b = bytearray(b)
        for j in range(pixels, pixels + 4000, 7):
            b[j] ^= 0x5A
        return bytes(b)

    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    damaged = {"noise": noise(good), "all 0xFF": b"\xff" * len(good),
               "wrong shape": saved(want[:5]), "wrong dtype": saved(want.float()),
               "wrong type": saved({"images": [1, 2, 3]}), "not a dict": saved([want])}
    for what, blob in damaged.items():
        entry.write_bytes(blob)
        capsys.readouterr()
        assert torch.equal(decode_all(files, 1, None), want), what
        assert "damaged" in capsys.readouterr().err, what
        assert torch.equal(decode_all(files, 1, None), want), what  # and rebuilt: the next read is clean
        assert "damaged" not in capsys.readouterr().err, what
