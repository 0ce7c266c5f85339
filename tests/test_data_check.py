"""Data checks find every planted problem by path, with no false positives; the CIFAR zip is clean."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import DATASETS, DataSource, ImageSet
from cnnlab.data.base import decode
from cnnlab.data.check import DataCheckError, check, errors, fast_check, print_findings, require_trainable, summary
from cnnlab.data.cli import main as data_main

ZIP_NAME = "cifar10-jpeg-train.zip"  # CI keeps it at ../shared/datasets relative to the repo root
CIFAR_ZIP = next((p for p in [Path(__file__).resolve().parents[2] / "shared" / "datasets" / ZIP_NAME,
                              Path("/work/shared/datasets") / ZIP_NAME] if p.is_file()), None)


def make_folder(root: Path, *, splits=("train", "val"), classes=("c0", "c1", "c2"), per_class=3, size=16) -> Path:
    """A clean <split>/<class>/<i>.png data set of distinct random images."""
    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            (root / s / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / s / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("clean") / "ds")


def test_clean_folder_has_no_findings(clean):
    src = DATASETS.get("folder")(str(clean))
    assert check(src, jobs=1) == [] and require_trainable(src) == []


def plant_bad_files(root: Path) -> dict[str, tuple[str, str]]:
    """Ten problems; returns path -> (severity, kind) of what check must report."""
    rng = np.random.default_rng(1)
    t = root / "train"
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    (t / "c0" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    (t / "c1" / "zero.png").write_bytes(b"")
    (t / "c2" / "notes.jpg").write_text("these are my notes, not an image\n")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(t / "c0" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).quantize(16).save(t / "c1" / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(t / "c2" / "deep16.png")  # I;16
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(t / "c0" / "cmyk.jpg")
    Image.new("L", (300, 300), 7).save(t / "c1" / "huge.png")  # over the limit the test sets
    (t / "empty_class").mkdir()
    shutil.rmtree(root / "val" / "c2")  # class missing from val
    return {
        str(t / "c0" / "truncated.jpg"): ("error", "truncated"),
        str(t / "c1" / "zero.png"): ("error", "zero_byte"),
        str(t / "c2" / "notes.jpg"): ("error", "unreadable"),
        str(t / "c1" / "huge.png"): ("error", "huge"),
        str(t / "empty_class"): ("error", "empty_class"),
        str(root / "val" / "c2"): ("warning", "class_mismatch"),
        str(t / "c0" / "rgba.png"): ("warning", "converted"),
        str(t / "c2" / "deep16.png"): ("warning", "converted"),
        str(t / "c1" / "palette.png"): ("info", "converted"),
        str(t / "c0" / "cmyk.jpg"): ("info", "converted"),
    }


def test_ten_planted_problems_reported_by_path(clean, tmp_path, monkeypatch, capsys):
    root = tmp_path / "bad"
    shutil.copytree(clean, root)
    expected = plant_bad_files(root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # the forked workers inherit it
    src = DATASETS.get("folder")(str(root))
    findings = check(src, jobs=2)
    got = {f.path: (f.severity, f.kind) for f in findings}
    assert len(got) == len(findings), f"a path was reported twice: {findings}"
    assert got == expected  # every problem found, nothing else reported
    for f in findings:
        if f.path.endswith("truncated.jpg"):
            assert "truncated" in f.message
    # the convertible modes still load as 3 x H x W
    for name in ["c0/rgba.png", "c1/palette.png", "c2/deep16.png", "c0/cmyk.jpg"]:
        x = decode(str(root / "train" / name), 3, None)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    # the trainer's cheap check sees the structural errors without decoding anything
    fast = {(f.path, f.kind) for f in errors(fast_check(src))}
    assert fast == {(str(root / "train" / "c1" / "zero.png"), "zero_byte"),
                    (str(root / "train" / "empty_class"), "empty_class")}
    with pytest.raises(DataCheckError, match="2 error") as e:
        require_trainable(src)  # what the trainer calls before step 0
    assert str(root / "train" / "c1" / "zero.png") in str(e.value) and "empty_class" in str(e.value)
    # the CLI: grouped, every error path printed, non-zero exit
    capsys.readouterr()
    assert data_main(["check", str(root), "--jobs", "1", "--max-pixels", "10000"]) == 1
    out = capsys.readouterr().out
    for path, (sev, _) in expected.items():
        if sev == "error":
            assert path in out
    assert "ERROR truncated (1)" in out and "5 errors, 3 warnings, 2 info" in out


def test_duplicates_within_and_across_splits(clean, tmp_path, capsys):
    root = tmp_path / "dups"
    shutil.copytree(clean, root)
    shutil.copy(root / "train" / "c0" / "0.png", root / "train" / "c0" / "copy.png")
    shutil.copy(root / "train" / "c1" / "0.png", root / "train" / "c2" / "relabelled.png")
    shutil.copy(root / "train" / "c2" / "1.png", root / "val" / "c2" / "leaked.png")
    # same pixels, different bytes (a PNG saved with other compression)
    Image.open(root / "train" / "c1" / "1.png").save(root / "train" / "c1" / "recoded.png", compress_level=0)
    findings = check(DATASETS.get("folder")(str(root)), jobs=1)
    assert not errors(findings)
    by_kind = {}
    for f in findings:
        by_kind.setdefault(f.kind, []).append(f)
    assert set(by_kind) == {"duplicate", "duplicate_across_splits"}
    dup_paths = {(f.path, o) for f in by_kind["duplicate"] for o in f.others}
    assert (str(root / "train/c0/0.png"), str(root / "train/c0/copy.png")) in dup_paths
    assert (str(root / "train/c1/0.png"), str(root / "train/c2/relabelled.png")) in dup_paths
    assert (str(root / "train/c1/1.png"), str(root / "train/c1/recoded.png")) in dup_paths
    assert any("labelled c1 and c2" in f.message for f in by_kind["duplicate"])
    (leak,) = by_kind["duplicate_across_splits"]
    assert leak.path == str(root / "train/c2/1.png") and leak.others == (str(root / "val/c2/leaked.png"),)
    s = summary(findings)
    assert s["duplicate_images"] == 3 and s["leaked_images"] == 1
    capsys.readouterr()
    assert data_main(["check", str(root), "--json", "--jobs", "1"]) == 0  # warnings only: exit 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == s and len(report["findings"]) == len(findings)


def test_fast_check_in_memory_labels_classes_ids():
    imgs = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    imgs[:, 0, 0, 0] = torch.arange(6, dtype=torch.uint8)
    train = ImageSet(labels=np.array([0, 0, 1, 1, 5, 1]), classes=["a", "b", "c"], images=imgs,
                     ids=["s0", "s1", "s2", "s3", "s4", "s1"])
    val = ImageSet(labels=np.array([2]), classes=["a", "b", "c"], images=imgs[:1].clone(), ids=["s0"])
    found = {(f.severity, f.kind, f.path) for f in fast_check(DataSource(train=train, val=val, classes=["a", "b", "c"]))}
    assert found == {("error", "label_range", "s4"), ("error", "duplicate_id", "s1"),
                     ("error", "class_mismatch", "val/c"), ("warning", "class_mismatch", "val/a"),
                     ("warning", "class_mismatch", "val/b"), ("error", "duplicate_id", "s0")}
    # the full check also hashes in-memory images: val's only image equals train's first
    assert any(f.kind == "duplicate_across_splits" for f in check(DataSource(train=train, val=val, classes=["a", "b", "c"])))


def test_print_findings_limits_long_groups(capsys):
    from cnnlab.data.check import Finding

    print_findings([Finding("warning", "converted", f"f{i}.png", "mode L") for i in range(25)], limit=10)
    out = capsys.readouterr().out
    assert "WARNING converted (25)" in out and "... and 15 more" in out and "f24.png" not in out


@pytest.mark.skipif(CIFAR_ZIP is None, reason="cifar10-jpeg-train.zip not available")
def test_cifar_zip_check_has_no_errors(capsys):
    """Every 4th image of the zip (12,500, read straight from it by worker processes); the whole
    zip takes ~7 s on 2 idle cores: `cnnlab data check ../shared/datasets/cifar10-jpeg-train.zip`."""
    src = DATASETS.get("folder")(str(CIFAR_ZIP))
    src.train = src.train.subset(np.arange(0, len(src.train), 4))
    findings = check(src)
    assert not errors(findings), [str(f) for f in errors(findings)[:5]]
    print_findings(findings)
    assert "duplicates:" in capsys.readouterr().out
