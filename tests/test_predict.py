"""`cnnlab predict` and `cnnlab.load`: the same numbers as the run's own evaluation, every input kind,
bad files reported by name, atomic outputs, the Grad-CAM page; `cnnlab eval` matching classes by name."""
from __future__ import annotations

import csv
import itertools
import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from inproc import run_cli

CLASSES = ["cat", "dog", "frog"]
LAYERS = [{"conv": {"out": 8, "k": 3, "padding": 1}}, "batchnorm", "relu", {"maxpool": 2}, "flatten",
          {"linear": "classes"}]


def make_folder(root, n=24, size=12, seed=0):
    """Class folders of RGB PNGs whose colour depends on the class (so a model learns something)."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 200, (size, size, 3)).astype(np.uint8)
            a[..., k] = np.clip(a[..., k].astype(int) + 80, 0, 255)
            Image.fromarray(a).save(root / cls / f"{i:03d}.png")
    return root


def train(data, out, loader):
    cfg = {"data": {"name": "folder", "root": str(data), "val_split": 0.2, "test_split": 0.25, "loader": loader},
           "model": {"name": "layers", "layers": LAYERS},
           "optim": {"name": "adam", "lr": 0.01}, "schedule": {"name": "none"},
           "train": {"epochs": 2, "batch_size": 16, "progress": "off"},
           "output": {"dir": str(out), "name": f"run-{loader}", "report": False}}
    return cnnlab.train(cfg, quiet=True).dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    data = make_folder(base / "data")
    return {"data": data, "memory": train(data, base / "runs", "memory"), "stream": train(data, base / "runs", "stream")}


def cli(*args, timeout=240):
    """`cnnlab ARGS` in a real process: its exit status and its stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


cli_here = run_cli  # the same command in this process (tests/inproc.py): what it prints, writes and returns


def run_predictions(run_dir):
    """{id: (top-1 name, probabilities (K,))} from the run's predictions.csv/.npz."""
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probs = torch.from_numpy(np.load(run_dir / "predictions.npz")["logits"]).softmax(1).numpy()
    return {r["id"]: (r["pred_name"], probs[int(r["index"])]) for r in rows}


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_predict_matches_the_runs_own_predictions(runs, loader, tmp_path):
    run_dir = runs[loader]
    expected = run_predictions(run_dir)
    out = tmp_path / "p.jsonl"
    r = cli_here("predict", run_dir, runs["data"], "--top-k", "3", "--out", out, "--batch-size", "5")
    assert r.returncode == 0, r.stderr
    got = {}
    for line in out.read_text().splitlines():
        o = json.loads(line)
        got[o["path"]] = (o["class"], np.array([dict((t["class"], t["prob"]) for t in o["top"])[c] for c in CLASSES]))
    assert len(got) == 3 * 24 and set(expected) <= set(got)  # every image of the folder, the evaluated ones included
    for ref, (name, probs) in expected.items():
        assert got[ref][0] == name, ref
        np.testing.assert_allclose(got[ref][1], probs, atol=1e-5, err_msg=ref)


def test_python_api_mirrors_the_cli(runs, tmp_path):
    run_dir = runs["memory"]
    expected = run_predictions(run_dir)
    clf = cnnlab.load(run_dir)
    assert clf.classes == CLASSES and not clf.model.training
    ids = sorted(expected)[:6]
    preds = clf.predict(ids)
    for ref, p in zip(ids, preds):
        assert p.label == expected[ref][0]
        np.testing.assert_allclose(p.probs, expected[ref][1], atol=1e-5)
        assert p.top(2)[0] == (p.label, pytest.approx(p.confidence))
    # one image as a path, a PIL image, an (H, W, C) array, a (C, H, W) uint8 tensor and a float tensor
    path = ids[0]
    img = Image.open(path)
    arr = np.array(img)
    ten = torch.from_numpy(arr).permute(2, 0, 1)
    probs = [clf.predict_proba(x) for x in (path, img, arr, ten, ten.float() / 255)]
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=1e-6)
    batch = clf.predict_proba(np.stack([arr, arr]))
    assert batch.shape == (2, 3) and np.allclose(batch.sum(1), 1, atol=1e-5)
    x = clf.transform(path)
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    with torch.no_grad():
        np.testing.assert_allclose(clf.model(x[None]).softmax(1)[0].numpy(), probs[0], atol=1e-5)


def png_header_only(path, w, h):
    """A PNG whose header claims w x h (no pixel data): decompression-bomb bait."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_bad_inputs_are_reported_by_name_and_the_rest_predicted(runs, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(runs["data"] / "cat" / "000.png", d / "good.png")
    (d / "text.jpg").write_text("this is not a picture\n")
    (d / "empty.png").write_bytes(b"")
    Image.new("CMYK", (20, 20), (0, 200, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 250).save(d / "deep16.png")
    png_header_only(d / "huge.png", 20000, 20000)
    (d / "notes.txt").write_text("not an image, not an image name: ignored with a note\n")
    out = tmp_path / "p.csv"
    r = cli("predict", runs["memory"], d, d / "missing.png", "--out", out)
    assert r.returncode == 3, r.stderr  # 3: some inputs skipped, the rest predicted
    assert "Traceback" not in r.stderr
    for name, why in [("text.jpg", "not an image"), ("empty.png", "empty file"), ("huge.png", "too large"),
                      ("missing.png", "no such file")]:
        line = next((ln for ln in r.stderr.splitlines() if ln.startswith("cnnlab: skipped") and name in ln), "")
        assert why in line, (name, r.stderr)
    assert "CMYK" in r.stderr and "16-bit" in r.stderr and "notes.txt" in r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r_["path"].rsplit("/", 1)[1] for r_ in rows) == ["cmyk.jpg", "deep16.png", "good.png"]
    assert all(r_["class_1"] in CLASSES and 0 < float(r_["prob_1"]) <= 1 for r_ in rows)


def test_zips_globs_and_a_single_file_on_the_terminal(runs, tmp_path):
    z = tmp_path / "imgs.zip"
    shutil.make_archive(str(z.with_suffix("")), "zip", runs["data"] / "dog")
    r = cli_here("predict", runs["memory"], z, str(runs["data"] / "frog" / "00*.png"), runs["data"] / "cat" / "001.png",
            "--top-k", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 24 + 10 + 1
    assert lines[0].startswith(f"{z}::000.png") and any("frog/003.png" in ln for ln in lines)
    assert all(sum(c in ln for c in CLASSES) >= 2 for ln in lines)  # two classes with percentages per row


def test_missing_run_or_checkpoint_exits_2_with_one_line(runs, tmp_path):
    r = cli("predict", tmp_path / "nope", runs["data"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such run folder" in r.stderr, r.stderr
    broken = tmp_path / "run"
    shutil.copytree(runs["memory"], broken)
    shutil.rmtree(broken / "checkpoints")
    for cmd in (["predict", broken, runs["data"]], ["export", broken, "--format", "onnx"]):
        r = cli_here(*cmd)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "no checkpoint" in r.stderr and "checkpoints/best.pt" in r.stderr


def test_a_failed_predict_leaves_an_existing_output_untouched(runs, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("keep me\n")
    r = cli_here("predict", runs["memory"], tmp_path / "empty-folder-does-not-exist", "--out", out)
    assert r.returncode == 2 and "nothing written" in r.stderr and out.read_text() == "keep me\n"
    (tmp_path / "empty").mkdir()
    r = cli_here("predict", runs["memory"], tmp_path / "empty", "--out", out)
    assert r.returncode == 2 and "no images found" in r.stderr and out.read_text() == "keep me\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_gradcam_page_is_self_contained(runs, tmp_path):
    out = tmp_path / "p.json"
    r = cli_here("predict", runs["memory"], runs["data"] / "dog", "--out", out, "--gradcam", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    page = (tmp_path / "p.html").read_text()
    assert len(rows) == 24 and all(r_["path"] in page for r_ in rows)
    assert page.count('src="data:image/png;base64,') == 2 * 24  # each image and its overlay, embedded
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page


def test_batches_stream_lazily(runs):
    """However many inputs, only a few batches are decoded ahead: an endless input stream still yields."""
    from cnnlab.deploy import inputs as I

    calls = []
    real = I.load_one

    def counting(ref, channels, size, *resize):
        calls.append(ref)
        return real(ref, channels, size, *resize)

    I.load_one, saved = counting, I.load_one
    try:
        ref = str(runs["data"] / "cat" / "000.png")
        endless = (I.Found(ref) for _ in itertools.count())
        gen = I.batches(endless, batch_size=8, channels=3, size=12, ahead=2)
        first = [next(gen) for _ in range(3)]
    finally:
        I.load_one = saved
    assert [len(b.refs) for b in first] == [8, 8, 8] and first[0].pixels.shape == (8, 3, 12, 12)
    assert len(calls) <= 8 * (3 + 3)  # the 3 batches taken and at most `ahead` + 1 more in flight


def test_eval_maps_classes_by_name(runs, tmp_path):
    """Data with a subset of the run's classes is scored against the run's class indices; an unknown class
    name is an error that names it."""
    sub = tmp_path / "sub"
    for cls in ("frog", "dog"):
        shutil.copytree(runs["data"] / cls, sub / cls)
    r = cli_here("eval", runs["memory"], f"data.root={sub}")
    assert r.returncode == 0, r.stderr
    dest = sorted((runs["memory"] / "evals").iterdir(), key=lambda p: int(p.name))[-1]
    with open(dest / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r_["target_name"] for r_ in rows} <= {"dog", "frog"}
    assert all(int(r_["target"]) == CLASSES.index(r_["target_name"]) for r_ in rows)
    m = json.loads((dest / "metrics.json").read_text())
    assert m["data_classes"] == ["dog", "frog"] and m["test"]["num_classes"] == len(m["test"]["confusion"]) == 3
    assert [c["support"] for c in m["test"]["per_class"]][0] == 0  # no cat in the data
    shutil.copytree(runs["data"] / "cat", sub / "horse")
    r = cli_here("eval", runs["memory"], f"data.root={sub}")
    assert r.returncode == 2 and "['horse']" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluate_and_compare_from_python(runs, tmp_path):
    r = cnnlab.evaluate(runs["stream"], root=str(runs["data"]))
    m = json.loads((runs["stream"] / "metrics.json").read_text())
    assert r["test"]["accuracy"] == pytest.approx(m["test"]["accuracy"])  # same data, same checkpoint
    page = cnnlab.compare([runs["memory"], runs["stream"]], out=tmp_path / "cmp")
    assert page.is_file() and (tmp_path / "cmp" / "comparison.json").is_file()
