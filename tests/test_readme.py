"""The README read against the code: its Configuration block holds the real defaults, and every
command of its "Everyday use" block runs (on small data, without a download), so it cannot drift."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from inproc import run_cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def block(heading: str, lang: str) -> str:
    """The first ```lang block after `heading`."""
    after = README[README.index(heading):]
    return re.search(rf"```{lang}\n(.*?)```", after, re.S).group(1)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_configuration_block_shows_the_real_defaults():
    from cnnlab import config as C

    shown = _flat(yaml.safe_load(block("## Configuration", "yaml")))
    defaults = _flat(C.to_dict(C.load(None)))
    assert len(shown) >= 30
    for key, value in shown.items():
        assert key in defaults, f"README shows {key}, which is not a config key"
        assert value == defaults[key], f"README shows {key}: {value!r}, the default is {defaults[key]!r}"


def everyday_commands() -> list[list[str]]:
    text = block("## Everyday use", "bash").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split("  #")[0].strip()
        if line:
            out.append(shlex.split(line))
    return out


def _images(folder: Path, zip_path: Path) -> None:
    """Three classes of 32x32 RGB JPEGs, as a folder and as a zip of class folders."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(zip_path, "w") as z:
        for c, name in enumerate(["cat", "dog", "frog"]):
            (folder / name).mkdir(parents=True)
            for i in range(24):
                img = np.clip(rng.normal(60 + 70 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / name / f"{i:03d}.jpg", quality=90)
                z.write(folder / name / f"{i:03d}.jpg", f"{name}/{i:03d}.jpg")


@pytest.mark.slow
def test_every_everyday_command_runs(tmp_path, monkeypatch):
    commands = everyday_commands()
    assert all(c[0] == "cnnlab" for c in commands) and len(commands) >= 12
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    _images(tmp_path / "my-images", tmp_path / "my-images.zip")
    shutil.copy(tmp_path / "my-images.zip", tmp_path / "other.zip")
    shutil.copytree(tmp_path / "my-images" / "cat", tmp_path / "photos")  # new images to classify
    shutil.copytree(tmp_path / "my-images" / "dog", tmp_path / "new")
    shutil.copy(tmp_path / "my-images.zip", tmp_path / "more.zip")
    # small and offline: the official CIFAR-10 the examples name is swapped for the folder above, one short epoch
    small = ["data.name=folder", "data.root=my-images.zip", "data.download=false", "data.val_split=0.25",
             "data.test_split=0.25", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=64",
             "train.progress=off", "output.report=false", "output.tensorboard=false"]
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        args = cmd[1:]
        if args[0] == "train" and "--resume" not in args:
            args = args + small
        if args == ["--version"]:  # the real entry point, as a user starts it (cheap: no torch behind --version)
            from cnnlab import __version__

            r = subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0 and r.stdout.strip() == f"cnnlab {__version__}", (r.stdout, r.stderr)
            continue
        r = run_cli(*args)  # in this process, through the CLI's own main (each start-up costs ~3 s)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    assert (tmp_path / "runs" / "cifar10-convnet" / "report.html").is_file()


def test_ci_runs_the_readmes_test_command():
    """.ci/run tests exactly as the README's quick start tells a user to; pyproject's addopts add
    `--dist loadgroup`, which keeps each xdist_group (the torchrun tests, the Ray tests) on one worker."""
    import tomllib

    def pytest_part(text: str) -> str:
        return re.search(r"(?m)\.venv/bin/pytest[^\n]*$", text).group(0).strip()

    after = README[README.index("## Quick start"):README.index("## Everyday use")]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert pytest_part(after) == pytest_part(ci) == ".venv/bin/pytest -q -n 2"
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--dist loadgroup" in addopts
