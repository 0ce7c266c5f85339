"""Config errors fail before any work starts, name the key and the value, and exit 2 from the CLI."""
import subprocess
import sys

import pytest
import torch

from cnnlab import config as C
from inproc import run_cli


def test_defaults_and_overrides_are_typed():
    cfg = C.load(None, ["optim.lr=0.05", "data.val_split=5000", "data.augment.hflip=true", "train.epochs=3"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.data.val_split, int) and cfg.data.augment.hflip
    assert C.load(None, ["data.val_split=0.2"]).data.val_split == 0.2


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-4` as the string "1e-4"; people write it that way, so a float field takes it
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  weight_decay: 1e-4\n  lr: 5E-3\n")
    cfg = C.load(p, ["schedule.min_lr=1e-6"])
    assert (cfg.optim.weight_decay, cfg.optim.lr, cfg.schedule.min_lr) == (1e-4, 5e-3, 1e-6)
    with pytest.raises(C.ConfigError, match="optim.lr"):
        C.load(None, ["optim.lr=1e-4x"])


def test_exponent_without_a_dot_is_a_number_in_untyped_settings_too(tmp_path):
    # model.options / data.options / grid values have no type to coerce to: the YAML reader itself must
    # read 1e-5 as a number (it reached the model builder as the text "1e-5")
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  options: {eps: 1e-5, width: 8, name: e5}\ngrid:\n  optim.lr: [1e-3, 2E-2, 0.1]\n")
    cfg = C.load(p, ["data.options.fold=1e0"])
    assert cfg.model.options == {"eps": 1e-5, "width": 8, "name": "e5"} and cfg.grid["optim.lr"] == [1e-3, 2e-2, 0.1]
    assert cfg.data.options == {"fold": 1.0} and C.parse_value("-1.5e+3") == -1500.0 and C.parse_value("1e") == "1e"


def test_dotted_keys_one_way():
    nested = {"model": {"options": {"a": {"b": 1}}, "batchnorm": True}, "train": {"early_stop": {"patience": 2}},
              "grid": {"optim.lr": [1, 2]}, "optim.lr": 0.5}
    flat = C.flatten(nested)
    assert flat == {"model.options": {"a": {"b": 1}}, "model.batchnorm": True, "train.early_stop.patience": 2,
                    "grid": {"optim.lr": [1, 2]}, "optim.lr": 0.5}
    tree: dict = {}
    for k, v in flat.items():
        C.set_dotted(tree, k, v)
    assert C.flatten(tree) == flat and tree["optim"] == {"lr": 0.5}
    valid = {"model": {"batchnorm": True}, "train": {"early_stop": {"patience": 2}}, "optim": {"lr": 0.5}}
    assert C.load(None, C.flatten(valid)) == C.load(valid)  # dotted overrides load as the nested tree does


def test_yaml_round_trip(tmp_path):
    cfg = C.load("examples/quickstart.yaml", ["optim.lr=0.01"])
    p = tmp_path / "c.yaml"
    p.write_text(C.dump_yaml(cfg))
    assert C.load(p) == cfg


@pytest.mark.parametrize("override, words", [
    (["optim.lr=-0.1"], ["optim.lr", "-0.1"]),
    (["train.batch_size=0"], ["train.batch_size", "0"]),
    (["optim.lrr=0.1"], ["optim.lrr", "optim.lr"]),
    (["train.epochs=three"], ["train.epochs", "three"]),
    (["optim.name=sgdd"], ["optim.name", "sgd"]),
    (["data.val_split=1.5"], ["data.val_split", "1.5"]),
    (["model.dropout=1.2"], ["model.dropout", "1.2"]),
    (["schedule.name=cosinus"], ["schedule.name", "cosine"]),
    (["lr=0.1"], ["lr"]),
])
def test_bad_values_name_key_and_value(override, words):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("override, words", [
    (["data.name=cifar11"], ["data.name", "cifar11", "cifar10"]),
    (["model.name=lenet"], ["model.name", "lenet", "lenet5"]),
])
def test_unknown_names_are_refused_where_things_are_built(override, words):
    """cnnlab.config checks values; the registries' names are checked by data/catalog and models/build
    (experiment.check_names runs both before any work), with the key, the value and the closest names."""
    from cnnlab.training.experiment import check_names

    cfg = C.load(None, override)
    with pytest.raises(C.ConfigError) as e:
        check_names(cfg)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: [1\n")
    with pytest.raises(C.ConfigError, match="bad.yaml"):
        C.load(p)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.yaml")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_exit_2_before_any_work(tmp_path):  # a real process: the exit status as the shell sees it
    r = _cli("train", "examples/quickstart.yaml", "optim.lr=-1", f"output.dir={tmp_path}/runs")
    assert r.returncode == 2
    assert "optim.lr" in r.stderr and "-1" in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("override, words", [
    ("model.name=lenet", ["model.name", "'lenet'", "Did you mean 'lenet5'"]),
    ("data.name=cifar11", ["data.name", "'cifar11'", "Did you mean 'cifar10'"]),
])
def test_cli_unknown_name_exits_2_before_any_work(tmp_path, override, words):
    r = run_cli("train", "examples/quickstart.yaml", override, f"output.dir={tmp_path}/runs")  # in this process
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_device_without_cuda_is_a_config_error(tmp_path):
    """Was a RuntimeError traceback (exit 1) from inside training; now refused at process setup (exit 2)."""
    r = run_cli("train", "examples/quickstart.yaml", "train.device=cuda", f"output.dir={tmp_path}/runs")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "train.device='cuda'" in r.stderr and "train.device=cpu" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_print_config_resolves_overrides():
    r = run_cli("train", "examples/quickstart.yaml", "optim.lr=0.123", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "lr: 0.123" in r.stdout and "name: digits" in r.stdout


def test_every_public_name_of_the_config_package_is_on_its_face():
    """config/ is split by concern (schema, coerce, dotted, checks); `from cnnlab import config as C` reaches every
    public name each part defines, the very object (ConfigError is one class, patched and caught as one)."""
    import ast
    import importlib
    import pkgutil
    from pathlib import Path

    parts = sorted(m.name for m in pkgutil.iter_modules(C.__path__))
    assert parts == ["checks", "coerce", "dotted", "schema"]
    seen = 0
    for part in parts:
        mod = importlib.import_module(f"cnnlab.config.{part}")
        tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for name in sorted(n for n in names if not n.startswith("_") and n != "build"):  # build: C._build
            assert getattr(C, name, None) is getattr(mod, name), f"cnnlab.config.{part}.{name} is not C.{name}"
            seen += 1
    assert seen > 40 and C.ConfigError is importlib.import_module("cnnlab.config.schema").ConfigError
