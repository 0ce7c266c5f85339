"""Security: nothing cnnlab reads can run code. Checkpoints load with weights_only=True and hold only
tensors and plain types; configs load with yaml.safe_load; archives with `../` or absolute entries are
refused. Each attack carries a payload that would create a sentinel file; the sentinel never appears.
"""
from __future__ import annotations

import ast
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from cnnlab.training import checkpoint as ckpt
from cnnlab import cli

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "cnnlab"

TINY = {
    "data": {"name": "digits", "val_split": 0.15, "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 4, "k": 3}}, "relu", "flatten", {"linear": "classes"}]},
    "train": {"epochs": 1, "batch_size": 64, "progress": "off", "threads": 1},
    "output": {"report": False, "name": "tiny"},
}


class Payload:
    """Unpickling this runs a shell command that creates `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ----------------------------------------------------------------------------------------------
# The source tree: every torch.load uses weights_only=True, no unsafe loader anywhere


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else \
                f.id if isinstance(f, ast.Name) else None
            yield name, node


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a constant>"
    return None


def test_every_torch_load_in_the_package_uses_weights_only():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found, problems = 0, []
    for path in files:
        text = path.read_text()
        rel = path.relative_to(REPO)
        # the grep: every mention of torch.load must be a call (no alias that could be called unsafely)
        mentions = len(re.findall(r"\btorch\.load\b", text))
        calls = [n for name, n in _calls(ast.parse(text)) if name == "torch.load"]
        found += len(calls)
        if mentions != len(calls) and not re.search(r"weights_only", text):
            problems.append(f"{rel}: torch.load mentioned {mentions}x but called {len(calls)}x")
        for n in calls:
            if _kw(n, "weights_only") is not True:
                problems.append(f"{rel}:{n.lineno}: torch.load without weights_only=True")
        if re.search(r"^\s*from torch import .*\bload\b", text, re.M):
            problems.append(f"{rel}: imports torch's load under another name")
        for name, n in _calls(ast.parse(text)):
            if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                        "marshal.loads", "dill.load", "dill.loads", "eval", "exec"):
                problems.append(f"{rel}:{n.lineno}: {name}(...) can run code; use the safe loader")
            if name in ("np.load", "numpy.load") and _kw(n, "allow_pickle") not in (None, False):
                problems.append(f"{rel}:{n.lineno}: np.load with allow_pickle")
    assert not problems, "\n".join(problems)
    assert found >= 2  # checkpoint.load and the others really were seen


def test_config_loading_uses_safe_load():
    import yaml

    from cnnlab.config import dotted

    texts = {f.name: f.read_text() for f in (SRC / "config").glob("*.py")}  # the config package (config/)
    assert {"__init__.py", "dotted.py"} <= set(texts)
    assert "yaml.safe_load" in texts["dotted.py"]  # its YAML loaders
    assert not any(re.search(r"yaml\.(load|unsafe_load|full_load)\(", t) for t in texts.values())
    assert issubclass(dotted._Loader, yaml.SafeLoader) and issubclass(dotted._UniqueKeyLoader, dotted._Loader)


def test_pyproject_requires_torch_2_6():
    # torch < 2.6 defaults torch.load to weights_only=False, and 2.6 fixed CVE-2025-32434 in it
    assert re.search(r'"torch>=2\.(6|[7-9]|\d\d)', (REPO / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------------------------
# A real run folder to attack


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = out / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output": {**TINY["output"], "dir": str(out)}}))
    assert cli.main(["train", str(cfg)]) == 0
    return out / "tiny"


def test_checkpoints_hold_only_tensors_and_plain_types(run_dir):
    for name in ("last.pt", "best.pt"):
        obj = torch.load(run_dir / "checkpoints" / name, weights_only=True)  # would raise on anything else
        ckpt.check_plain(obj)
        assert {"model", "optimizer", "scheduler", "state", "rng"} <= obj.keys()


def _evil_checkpoints(folder: Path, sentinel: Path) -> dict[str, bytes]:
    """Two malicious .pt files: torch.save's zip format, and a bare pickle (torch's legacy format)."""
    buf = io.BytesIO()
    torch.save({"model": Payload(sentinel), "state": {}}, buf)
    return {"zip": buf.getvalue(), "pickle": pickle.dumps({"model": Payload(sentinel)}, protocol=2)}


def test_the_payload_is_live(tmp_path):
    """The control: an unsafe load of the same bytes does run the payload (so the tests below mean something)."""
    sentinel = tmp_path / "pwned"
    evil = _evil_checkpoints(tmp_path, sentinel)
    torch.load(io.BytesIO(evil["zip"]), weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_malicious_checkpoint_is_refused_by_resume_and_eval(run_dir, tmp_path, kind, capsys):
    import shutil

    victim = tmp_path / "victim"
    shutil.copytree(run_dir, victim)
    sentinel = tmp_path / "pwned"
    data = _evil_checkpoints(tmp_path, sentinel)[kind]
    for name in ("last.pt", "best.pt"):
        (victim / "checkpoints" / name).write_bytes(data)

    assert cli.main(["train", "--resume", str(victim)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "last.pt" in err and "weights_only=True" in err and "GLOBAL" in err, err
    assert "weights_only` set to `False`" not in err  # torch's advice to load it unsafely is not repeated
    assert cli.main(["eval", str(victim)]) == 1
    assert cli.main(["eval", str(victim), "--checkpoint", "last"]) == 1
    err = capsys.readouterr().err
    assert err.count("refused") == 2, err
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load(victim / "checkpoints" / "best.pt")
    assert not sentinel.exists()


def test_model_pretrained_file_with_a_payload_is_refused(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    evil.write_bytes(_evil_checkpoints(tmp_path, sentinel)["zip"])
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output": {**TINY["output"], "dir": str(tmp_path / "runs")}}))
    assert cli.main(["train", str(cfg), f"model.pretrained={evil}"]) != 0
    assert "weights_only=True" in capsys.readouterr().err
    assert not sentinel.exists()


# ----------------------------------------------------------------------------------------------
# YAML


def _evil_yamls(sentinel: Path) -> dict[str, str]:
    cmd = f'!!python/object/apply:os.system ["touch {sentinel}"]'
    return {"top": f"{cmd}\n",
            "value": f"data:\n  name: digits\noptim:\n  lr: {cmd}\n",
            "new": f"train: !!python/object/new:os.system [\"touch {sentinel}\"]\n"}


def test_yaml_with_python_tags_is_refused_with_exit_2(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    for name, text in _evil_yamls(sentinel).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        assert cli.main(["train", str(path)]) == 2, name
        assert "not valid YAML" in capsys.readouterr().err
    # an override is read as YAML too: the tag makes it plain text, refused as a number
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert cli.main(["train", str(cfg), f"optim.lr=!!python/object/apply:os.system [\"touch {sentinel}\"]"]) == 2
    # a run folder whose config.yaml was tampered with
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.yaml").write_text(_evil_yamls(sentinel)["value"])
    assert cli.main(["train", "--resume", str(victim)]) == 2
    assert not sentinel.exists()
    with pytest.raises(yaml.constructor.ConstructorError):  # the control: safe_load itself refuses the tag
        yaml.safe_load(_evil_yamls(sentinel)["top"])


def test_yaml_refusal_through_the_real_cli(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(_evil_yamls(sentinel)["top"])
    r = subprocess.run([sys.executable, "-m", "cnnlab", "train", str(path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not valid YAML" in r.stderr, r.stderr
    assert not sentinel.exists()


# ----------------------------------------------------------------------------------------------
# Archives (cnnlab.data.download.safe_extract, used for every downloaded data set)


def _evil_archives(tmp_path: Path) -> dict[str, tuple[Path, list[Path]]]:
    """zip and tar archives with a `../` entry and an absolute entry; the files each would write."""
    out = {}
    for kind in ("zip", "tar"):
        for how in ("dotdot", "absolute"):
            sentinel = tmp_path / f"pwned-{kind}-{how}"
            name = f"../../pwned-{kind}-{how}" if how == "dotdot" else str(sentinel)
            path = tmp_path / f"evil-{how}.{'zip' if kind == 'zip' else 'tar.gz'}"
            if kind == "zip":
                with zipfile.ZipFile(path, "w") as zf:
                    zf.writestr("ok/readme.txt", "fine")
                    zf.writestr(name, "pwned")
            else:
                with tarfile.open(path, "w:gz") as tf:
                    for member, data in (("ok/readme.txt", b"fine"), (name, b"pwned")):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
            out[f"{kind}-{how}"] = (path, [sentinel, tmp_path.parent / sentinel.name])
    return out


def test_archives_with_dotdot_or_absolute_entries_are_refused(tmp_path):
    from cnnlab.data.download import UnsafeArchiveError, safe_extract

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    for key, (archive, sentinels) in _evil_archives(work).items():
        target = work / f"out-{key}"
        with pytest.raises(UnsafeArchiveError, match="refusing"):
            safe_extract(archive, target)
        assert not any(s.exists() for s in sentinels), key
        assert not any(p.is_file() for p in target.rglob("*")), key  # nothing at all was extracted
    assert not list(tmp_path.rglob("pwned*"))


def test_a_tampered_data_set_archive_never_reaches_extraction(tmp_path, capsys):
    """End to end: a CIFAR-10 archive swapped for an evil tar is refused by its checksum, before extraction."""
    root = tmp_path / "data"
    root.mkdir()
    archive, sentinels = _evil_archives(root)["tar-dotdot"]
    archive.rename(root / "cifar-10-python.tar.gz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {"name": "cifar10", "root": str(root), "download": False},
                                   "output": {**TINY["output"], "dir": str(tmp_path / "runs")}}))
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "md5" in err and "not extracted" in err, err
    assert not list(tmp_path.rglob("pwned*"))
    assert not (root / "cifar-10-batches-py").exists()
