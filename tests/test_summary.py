"""The summary's shape chain, formulas, receptive fields, warnings and totals; `cnnlab summary`."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.config import ModelConfig
from cnnlab.models import MODELS, build_model
from cnnlab import cli
from cnnlab.models import cli as models_cli
from cnnlab.models.summary import out_size, summarize


def _net1():
    return MODELS.get("net1")(num_classes=5, in_channels=3, input_size=64)


def test_net1_chain_formulas_and_receptive_fields():
    s = summarize(_net1(), (3, 64, 64), name="net1")
    assert s.chain[0] == ("64 -> 62 (conv k3) -> 31 (maxpool 2) -> 29 (conv k3) -> 14 (maxpool 2); "
                          "flatten = 32*14*14 = 6272")
    assert "0 (conv k3): floor((64 - 3 + 2*0) / 1) + 1 = 62; receptive field 3" in s.chain
    assert "5 (maxpool 2): floor((29 - 2 + 2*0) / 2) + 1 = 14; receptive field 10" in s.chain
    assert [r["rf"] for r in s.rows if r["type"] in ("Conv2d", "MaxPool2d")] == ["3", "4", "8", "10"]
    assert "0: conv 3->16 k3: (3*3*3 + 1)*16 = 448" in s.param_lines
    assert "7: linear 6272->64: (6272 + 1)*64 = 401,472" in s.param_lines
    assert len(s.warnings) == 1 and "29" in s.warnings[0] and "1 row and 1 column" in s.warnings[0]
    assert s.total_params == 406_885 and s.mult_adds > 0 and s.activation_bytes > 0
    text = s.text()
    assert "flatten = 32*14*14 = 6272" in text and "406,885" in text and "Mult-adds" in text


def test_to_dict_is_json_and_complete():
    s = summarize(build_model(ModelConfig(name="cifar_convnet"), num_classes=10, in_channels=3, input_size=32),
                  (3, 32, 32))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["total_params"] == d["trainable_params"] == 890_410 and d["frozen_params"] == 0
    assert {"layers", "chain", "warnings", "param_bytes", "activation_bytes"} <= set(d)
    assert d["layers"][0] == {"name": "0", "type": "Conv2d", "output": "32x30x30", "params": 896, "kernel": "3x3",
                              "mult_adds": 806_400, "rf": "3"}
    assert "flatten = 64*5*5 = 1600" in d["chain"][0] and not d["warnings"]


def test_resnet_chain_follows_the_main_path():
    s = summarize(MODELS.get("resnet18")(num_classes=10, in_channels=3, input_size=32), (3, 32, 32))
    assert s.chain[0].startswith("32 -> 32 (conv k3 p1) x5 -> 16 (conv k3 s2 p1) -> 16 (conv k3 p1) x3 -> 8")
    assert s.chain[0].endswith("1 (adaptive avgpool -> 1); flatten = 512*1*1 = 512")
    assert any("downsample" in line and "[side branch]" in line for line in s.chain)
    assert not s.warnings


def test_frozen_counts_and_modes_are_kept():
    model = build_model(ModelConfig(name="cifar_5x5", batchnorm=True, freeze="backbone"), num_classes=10,
                        in_channels=3, input_size=32)
    model.train()
    from cnnlab.models.hooks import keep_frozen_bn_eval

    keep_frozen_bn_eval(model)
    modes = [m.training for m in model.modules()]
    s = summarize(model, (3, 32, 32))
    assert [m.training for m in model.modules()] == modes  # torchinfo would reset them all
    assert s.trainable_params == 65 * 10 and s.frozen_params == s.total_params - 650


def test_shrinking_below_one_pixel_is_a_warning_not_a_crash():
    model = MODELS.get("vgg11_bn")(num_classes=10, in_channels=3, input_size=32)
    s = summarize(model, (3, 16, 16))
    assert any("below 1x1" in w and "floor((1 - 2 + 2*0) / 2) + 1 = 0" in w for w in s.warnings)
    assert s.total_params == sum(p.numel() for p in model.parameters()) == sum(r["params"] for r in s.rows)


@settings(max_examples=100, deadline=None)
@given(w=st.integers(1, 40), k=st.integers(1, 7), p=st.integers(0, 3), s=st.integers(1, 4), d=st.integers(1, 2),
       ceil=st.booleans(), pool=st.booleans())
def test_out_size_matches_pytorch(w, k, p, s, d, ceil, pool):
    if 2 * p > k or d * (k - 1) + 1 > w + 2 * p:  # PyTorch's own limits
        return
    layer = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil) if pool else nn.Conv2d(1, 1, k, s, p, d)
    if not pool:
        ceil = False
    try:
        got = layer(torch.zeros(1, 1, w, w)).shape[-1]
    except RuntimeError:
        return
    assert out_size(w, k, p, s, d, ceil) == got


def test_cli_summary_for_a_name_and_a_config(tmp_path, capsys):
    out_json = tmp_path / "s.json"
    assert cli.main(["summary", "net1", "--input", "3x64x64", "--classes", "5", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "64 -> 62 (conv k3) -> 31 (maxpool 2) -> 29 (conv k3) -> 14 (maxpool 2)" in text
    assert json.loads(out_json.read_text())["total_params"] == 406_885
    assert cli.main(["summary", "net1", "model.padding=1"]) == 0
    assert "flatten = 32*16*16 = 8192" in capsys.readouterr().out
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data: {name: digits, image_size: 32}\nmodel: {name: lenet5, batchnorm: true}\n")
    assert cli.main(["summary", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "lenet5 (10 classes) on 1x32x32" in text and "BatchNorm2d" in text
    assert cli.main(["summary", "nett1"]) == 2
    assert "net1" in capsys.readouterr().err  # did you mean
    assert cli.main(["summary", "net1", "--input", "3by64"]) == 2


@pytest.mark.parametrize("text, shape", [("3x32x32", (3, 32, 32)), ("32", (3, 32, 32)), ("1x28", (1, 28, 28))])
def test_parse_shape(text, shape):
    assert models_cli.parse_shape(text) == shape


def test_cli_summary_of_a_study_variation_without_its_data(tmp_path, capsys):
    """#13: a study's variation by name; a data set that is not here gives one note saying what was assumed,
    never the loader's advice for `train` (data.download, data.root), which summary does not act on."""
    from pathlib import Path

    exp4 = Path(__file__).resolve().parents[1] / "examples" / "seeds" / "exp4-stl10-lenet.yaml"
    away = f"data.root={tmp_path / 'nothing'}"
    assert cli.main(["summary", str(exp4), away, "--variation", "batchnorm"]) == 0
    got = capsys.readouterr()
    assert "total parameters:     62,458" in got.out  # LeNet with batch norm, as the experiment reports
    notes = [ln for ln in got.err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "assumed 10 classes and input 3x32x32" in notes[0]
    assert "data.download" not in got.err and "data.root" not in got.err and "--root" not in got.err
    assert cli.main(["summary", str(exp4), away]) == 0
    got = capsys.readouterr()
    assert "total parameters:     62,006" in got.out and "--variation NAME for one of main, batchnorm, l2" in got.err
    assert cli.main(["summary", str(exp4), away, "--variation", "batchnrom"]) == 2
    assert "Did you mean 'batchnorm'? Variations: main, batchnorm, l2" in capsys.readouterr().err
