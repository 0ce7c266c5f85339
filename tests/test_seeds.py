"""examples/seeds/: every classic experiment's config builds the network it describes (the parameter counts
its report gives) and trains for one short epoch, through the CLI, on small data written here in the data
set's official on-disk format (never downloaded): CIFAR-10's python batches, STL-10's binaries, MNIST-M's
PyTorch release, and the COCO-subset builder's output."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inproc import run_cli
from test_data_builders import CHOSEN, coco  # noqa: F401  (the fixture: a small COCO instances file)
from test_data_official import write_cifar10, write_stl10

SEEDS = Path(__file__).resolve().parents[1] / "examples" / "seeds"


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _params(out: str) -> int:
    return int(re.search(r"total parameters:\s+([\d,]+)", out).group(1).replace(",", ""))


@pytest.mark.parametrize("example, overrides, expected", [
    ("exp2-cifar10-5x5.yaml", [], 390_410),                                   # the baseline
    ("exp2-cifar10-5x5.yaml", ["model.batchnorm=true"], 391_006),             # Network 1
    ("exp3-cifar10-convnet-dropout.yaml", [], 890_410),
    ("exp4-stl10-lenet.yaml", [], 62_006),                                    # LeNet main on 3x32x32
    ("exp4-stl10-lenet.yaml", ["model.batchnorm=true"], 62_458),              # LeNet batch norm
    ("exp5-mnistm-resnet18-cut.yaml", [], 692_106),
])
def test_summary_prints_the_experiments_parameter_count(tmp_path, monkeypatch, capsys, example, overrides, expected):
    from cnnlab import cli

    monkeypatch.chdir(tmp_path)  # the command itself, in this process (one real subprocess below)
    assert cli.main(["summary", str(SEEDS / example), *overrides, "data.root=" + str(tmp_path / "nothing")]) == 0
    out, err = capsys.readouterr()
    assert _params(out) == expected
    assert "assumed 10 classes" in err  # no data set here: it says what it assumed
    assert "--root" not in err and "--no-download" not in err  # summary has no such flags


def test_summary_through_the_real_cli(tmp_path):
    r = _cli("summary", str(SEEDS / "exp2-cifar10-5x5.yaml"), "data.root=" + str(tmp_path / "nothing"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _params(r.stdout) == 390_410 and "assumed 10 classes" in r.stderr


def test_exp5_layer_list_is_resnet18_cut_after_layer2():
    from torchvision.models import resnet18

    from cnnlab.config import load
    from cnnlab.models import build_model

    cfg = load(SEEDS / "exp5-mnistm-resnet18-cut.yaml")
    model = build_model(cfg.model, num_classes=10, in_channels=3, input_size=64)
    ref = resnet18()
    kept = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith(("layer3", "layer4", "fc")))
    head = (128 * 64 + 64) + 2 * 64 + (64 * 10 + 10)  # Linear(128, 64), BatchNorm1d(64), Linear(64, 10)
    assert sum(p.numel() for p in model.parameters()) == kept + head
    trunk = model[0]
    assert [n for n, _ in trunk.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    assert trunk.layer2[0].downsample[0].stride == (2, 2) and trunk.conv1.stride == (2, 2)
    kinds = [type(m).__name__ for m in model[1:]]
    assert kinds == ["AdaptiveAvgPool2d", "Flatten", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def _write_mnist_m(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, n in [("train", 40), ("test", 10)]:
        x = torch.from_numpy(rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8))  # (N, H, W, C) as released
        torch.save((x, torch.arange(n) % 10), root / f"mnist_m_{split}.pt")


def _data(name: str, tmp_path: Path, coco_fixture) -> Path:
    root = tmp_path / "data"
    if name == "cifar10":
        write_cifar10(root, n=12)
    elif name == "stl10":
        write_stl10(root, n_train=20, n_test=10, n_unl=1)
    elif name == "mnist-m":
        _write_mnist_m(root)
    elif name == "folder":  # experiment 1: the coco-subset builder's output
        from cnnlab.data.builders import coco_subset

        base, _ = coco_fixture
        coco_subset(base / "instances.json", base / "images", CHOSEN, root, per_class=3, size=64, seed=0,
                    log=lambda s: None)
    return root


@pytest.mark.parametrize("example", sorted(p.name for p in SEEDS.glob("*.yaml")))
def test_every_seed_example_trains_one_short_epoch(tmp_path, example, coco):  # noqa: F811
    import yaml

    cfg = yaml.safe_load((SEEDS / example).read_text())
    assert re.search(r"(?m)^#.*cnnlab train examples/seeds/" + re.escape(example), (SEEDS / example).read_text())
    root = _data(cfg["data"]["name"], tmp_path, coco)
    small = [f"data.root={root}", "data.download=false", "data.val_split=0.2", "train.epochs=1",
             "train.limit_batches=2", "train.batch_size=8", "train.progress=off", f"output.dir={tmp_path / 'runs'}",
             "output.report=false", "output.tensorboard=false", "model.pretrained=null"]
    if cfg["data"].get("image_size") == 224:
        small.append("data.image_size=64")  # the fine-tune's 224 px costs minutes on a CPU; the recipe is the same
    # a variation's own train.epochs (the 100-epoch sweeps) wins over the command line, as it should in a
    # study: the copy run here caps it at one epoch and is otherwise the example itself
    short = tmp_path / example
    for ov in (cfg.get("variations") or {}).values():
        if "train.epochs" in ov:
            ov["train.epochs"] = 1
    short.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = run_cli("train", str(short), *small, cwd=tmp_path)  # in this process (tests/inproc.py)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "runs").rglob("metrics.json"))
    expected = len(cfg.get("variations") or {}) or 1
    assert len(runs) == expected, runs
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        assert 0 <= m["test"]["accuracy"] <= 1
        assert (run / "grads.csv").is_file() or not (run / "steps.csv").is_file()
