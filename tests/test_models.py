"""Every registered model builds, runs forward and backward at its default input; exact parameter counts;
external models; transfer learning from a local weights file with a frozen backbone (never downloads)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.config import ModelConfig
from cnnlab.models import MODELS, ModelConfigError, build_model, count_params
from cnnlab.models import hooks, transfer
from cnnlab.models.summary import summarize
from cnnlab.models.zoo import default_input

# builders with required options beyond the common ones
EXAMPLE_OPTIONS = {
    "layers": {"layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2}, "flatten",
                          {"linear": "classes"}]},
}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_forward_backward_and_summary(name):
    torch.manual_seed(0)
    c, h, w = default_input(name)
    model = MODELS.get(name)(num_classes=7, in_channels=c, input_size=h, **EXAMPLE_OPTIONS.get(name, {}))
    assert next(model.parameters()).device.type == "cpu"
    x = torch.randn(2, c, h, w)  # (B, C, H, W); batch 2 keeps the big ones cheap
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]  # some stems are frozen by design
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    s = summarize(model, (c, h, w), name=name)
    total = sum(p.numel() for p in model.parameters())
    assert s.total_params == total == sum(r["params"] for r in s.rows)
    assert s.trainable_params == sum(p.numel() for p in trainable) == total - s.frozen_params
    assert not any("below 1x1" in wn for wn in s.warnings)


@pytest.mark.parametrize("name, expected", [("cifar_convnet", 890_410), ("cifar_5x5", 390_410), ("lenet5", 61_706)])
def test_classic_parameter_counts(name, expected):
    c = 1 if name == "lenet5" else 3
    model = build_model(ModelConfig(name=name), num_classes=10, in_channels=c, input_size=32)
    assert count_params(model) == expected


@pytest.mark.parametrize("name, kw, expected", [
    ("cifar_5x5", {"batchnorm": True}, 391_006),                       # experiment 2, Network 1
    ("cifar_5x5", {"dropout": 0.05}, 390_410),                         # Network 2: dropout adds no parameters
    ("lenet5", {}, 62_006),                                            # experiment 4, LeNet main on 3x32x32
    ("lenet5", {"batchnorm": True}, 62_458),                           # LeNet batch norm
    ("cifar_5x5", {"batchnorm": True, "options": {"batchnorm_fc": "hidden"}}, 391_006 - 20),
    ("cifar_5x5", {"batchnorm": True, "options": {"batchnorm_fc": "none"}}, 390_410 + 448),
])
def test_classic_switch_parameter_counts(name, kw, expected):
    model = build_model(ModelConfig(name=name, **kw), num_classes=10, in_channels=3, input_size=32)
    assert count_params(model) == expected


def test_lenet_batchnorm_and_convnet_dropout_placements():
    lenet = build_model(ModelConfig(name="lenet5", batchnorm=True), num_classes=10, in_channels=3, input_size=32)
    assert [type(m).__name__ for m in lenet] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + \
        ["Flatten"] + ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    # experiment 3's improved model: dropout after each pool and one more after the first fc's ReLU
    net = build_model(ModelConfig(name="cifar_convnet", dropout=0.5, options={"dropout_fc": 0.5}), num_classes=10,
                      in_channels=3, input_size=32)
    kinds = [type(m).__name__ for m in net]
    assert kinds[kinds.index("Flatten"):] == ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert [i for i, k in enumerate(kinds) if k == "Dropout"] == [i + 1 for i, k in enumerate(kinds) if k == "MaxPool2d"] \
        + [len(kinds) - 2]
    with pytest.raises(ValueError, match="model.options.batchnorm_fc='last'"):
        build_model(ModelConfig(name="cifar_5x5", options={"batchnorm_fc": "last"}), num_classes=10, in_channels=3,
                    input_size=32)


def test_layer_lists_take_any_torch_activation_and_residual_blocks():
    from cnnlab.models.layers import LayerSpecError, build_layers

    m = build_layers([{"conv": 8}, {"elu": {"alpha": 0.5}}, "silu", "mish", {"leaky_relu": 0.1}, "selu", "prelu",
                      {"basic_block": {"out": 16, "stride": 2}}, {"basic_block": 16}, "global_avgpool",
                      {"linear": 12}, "batchnorm", "gelu", {"linear": "classes"}],
                     num_classes=5, in_channels=3, input_size=16)
    names = [type(x).__name__ for x in m]
    assert names[1:7] == ["ELU", "SiLU", "Mish", "LeakyReLU", "SELU", "PReLU"] and m[1].alpha == 0.5
    assert m[4].negative_slope == 0.1
    assert names[7:9] == ["BasicBlock", "BasicBlock"] and m[7].downsample is not None and m[8].downsample is None
    assert isinstance(m[-3], nn.BatchNorm1d) and m[-3].num_features == 12
    assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(LayerSpecError, match="Did you mean 'silu'"):
        build_layers(["sulu", {"linear": "classes"}], num_classes=2, in_channels=1, input_size=4)
    with pytest.raises(LayerSpecError, match="upto='layer5'.*layer4"):
        build_layers([{"torchvision": {"model": "resnet18", "upto": "layer5"}}, {"linear": "classes"}],
                     num_classes=2, in_channels=3, input_size=32)


def test_options_change_the_nets():
    n1 = build_model(ModelConfig(name="net1"), num_classes=5, in_channels=3, input_size=64)
    n1p = build_model(ModelConfig(name="net1", padding=1), num_classes=5, in_channels=3, input_size=64)
    n2 = build_model(ModelConfig(name="net2"), num_classes=5, in_channels=3, input_size=64)
    assert n1[-3].in_features == 32 * 14 * 14 and n2[-3].in_features == 32 * 16 * 16
    assert count_params(n1p) == count_params(n2)
    n3 = build_model(ModelConfig(name="net3"), num_classes=5, in_channels=3, input_size=64)
    assert sum(isinstance(m, nn.Conv2d) for m in n3.modules()) == 12
    bn = build_model(ModelConfig(name="cifar_5x5", batchnorm=True, dropout=0.3), num_classes=10, in_channels=3,
                     input_size=32)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 3
    # experiment 2's Network 1 / 2 placements: BN2d after each conv before its ReLU, BN1d after both linear
    # layers; dropout right after each of the three pools, none in the classifier
    kinds = [type(m).__name__ for m in bn]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout"] * 3 + \
        ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [m.p for m in bn.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.3]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in
               build_model(ModelConfig(name="lenet5", batchnorm=True), num_classes=10, in_channels=1,
                           input_size=32).modules()) == 2
    cifar = build_model(ModelConfig(name="resnet18"), num_classes=10, in_channels=3, input_size=32)
    imagenet = build_model(ModelConfig(name="resnet18", options={"cifar_stem": False}), num_classes=10,
                           in_channels=3, input_size=32)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_refused_options_name_the_key():
    with pytest.raises(ModelConfigError, match="model.padding"):
        build_model(ModelConfig(name="resnet18", padding=1), num_classes=10, in_channels=3, input_size=32)
    with pytest.raises(ModelConfigError, match="model.batchnorm"):
        build_model(ModelConfig(name="torchvision:resnet18", batchnorm=True), num_classes=10, in_channels=3,
                    input_size=32)


def test_torchvision_models_by_name():
    model = build_model(ModelConfig(name="torchvision:resnet18"), num_classes=4, in_channels=1, input_size=32)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert default_input("torchvision:resnet18") == (3, 224, 224)
    with pytest.raises(ModelConfigError, match="resnet18"):  # did you mean
        build_model(ModelConfig(name="torchvision:resnet81"), num_classes=4, in_channels=3, input_size=32)
    with pytest.raises(ModelConfigError, match="options"):
        build_model(ModelConfig(name="torchvision:resnet18", options={"no_such": 1}), num_classes=4,
                    in_channels=3, input_size=32)


def test_timm_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelConfigError, match="pip install timm"):
            build_model(ModelConfig(name="timm:resnet18"), num_classes=4, in_channels=3, input_size=32)
    else:
        pytest.skip("timm is installed")


# ---- transfer learning, from a locally saved file


@pytest.fixture
def r18_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    source = resnet18()  # ImageNet-shaped: 1000 classes, 7x7 stem
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def _frozen_r18(path, freeze="backbone", in_channels=3, classes=5):
    cfg = ModelConfig(name="resnet18", pretrained=str(path), freeze=freeze, options={"cifar_stem": False})
    return build_model(cfg, num_classes=classes, in_channels=in_channels, input_size=64)


def test_frozen_backbone_only_head_trains_and_backbone_stays_bit_identical(r18_file):
    path, saved = r18_file
    model = _frozen_r18(path)
    report = model.pretrained_report
    assert {k for k, _, _ in report.skipped} == {"fc.weight", "fc.bias"}  # the 1000-class head
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 and {id(p) for p in trainable} == {id(p) for p in model.fc.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(transfer.trainable_parameters(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(0)
    for _ in range(3):
        model.train()
        assert hooks.keep_frozen_bn_eval(model) == 20  # every BN of ResNet-18 stays in eval mode
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.randint(0, 5, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("fc."):
            assert not torch.equal(v, after[k])
        else:
            assert torch.equal(v, after[k]), k  # weights and BN running statistics alike


def test_freeze_first_stages_and_errors(r18_file):
    path, _ = r18_file
    model = _frozen_r18(path, freeze="2")  # stem + layer1
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert all(p.requires_grad for p in model.layer2.parameters())
    with pytest.raises(transfer.TransferError, match="model.freeze='9'.*5 stages"):
        _frozen_r18(path, freeze="9")
    net = build_model(ModelConfig(name="net1", freeze="backbone"), num_classes=5, in_channels=3, input_size=64)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["9.weight", "9.bias"]
    net = build_model(ModelConfig(name="net1", freeze="1"), num_classes=5, in_channels=3, input_size=64)
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["0.weight", "0.bias"]


def test_pretrained_file_variants(tmp_path, r18_file):
    path, saved = r18_file
    grey = _frozen_r18(path, freeze="none", in_channels=1)  # RGB stem summed to one channel
    assert grey.pretrained_report.adapted == ["conv1.weight"]
    assert torch.allclose(grey.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))
    wrapped = tmp_path / "ckpt.pt"  # a training checkpoint with a DataParallel prefix
    torch.save({"model": {f"module.{k}": v for k, v in saved.items()}, "epoch": 3}, wrapped)
    assert torch.equal(_frozen_r18(wrapped, freeze="none").layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    same_classes = _frozen_r18(path, freeze="none", classes=1000)
    assert torch.equal(same_classes.fc.weight, saved["fc.weight"]) and not same_classes.pretrained_report.skipped
    other = tmp_path / "net1.pt"
    torch.save(MODELS.get("net1")(num_classes=5, in_channels=3, input_size=64).state_dict(), other)
    with pytest.raises(transfer.TransferError, match="none of its"):
        _frozen_r18(other)
    pickled = tmp_path / "whole.pt"
    torch.save(MODELS.get("lenet5")(num_classes=10, in_channels=1, input_size=32), pickled)
    with pytest.raises(transfer.TransferError, match="weights_only"):
        _frozen_r18(pickled)
    with pytest.raises(transfer.TransferError, match="no such file"):
        _frozen_r18(tmp_path / "missing.pt")


def test_trainer_hook_keeps_frozen_bn_eval_also_in_copies(r18_file):
    import copy

    model = _frozen_r18(r18_file[0], freeze="2")
    for m in (model, copy.deepcopy(model)):  # EMA copies the model
        m.train()
        hooks.after_train_mode(m)  # what the loop calls after model.train()
        assert not m.bn1.training and not m.layer1[0].bn1.training and m.layer2[0].bn1.training


def test_input_spec_reads_the_weights_preset_offline(tmp_path):
    spec = transfer.input_spec("ResNet18_Weights.IMAGENET1K_V1")
    assert spec.resize == 224 and spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.std == pytest.approx((0.229, 0.224, 0.225))
    assert transfer.input_spec("DEFAULT", "torchvision:resnet18") == spec
    assert spec.eval_resize == 256  # its evaluation recipe: shorter side 256, then the 224 center crop
    assert transfer.input_spec(str(tmp_path / "w.pt")) == (None, None, None, None)
    assert transfer.input_spec(None) == (None, None, None, None)
    with pytest.raises(transfer.TransferError, match="model.pretrained='Nope_Weights.X'"):
        transfer.input_spec("Nope_Weights.X")
    from cnnlab.config import DataConfig

    mcfg = ModelConfig(name="resnet18", pretrained="ResNet18_Weights.IMAGENET1K_V1")
    assert transfer.data_defaults(mcfg, DataConfig()) == {"image_size": 224, "mean": spec.mean, "std": spec.std,
                                                          "channels": 3, "eval_resize_size": 256}
    # the user's own size and statistics are kept; the eval recipe scales with the size (64 * 256 / 224)
    assert transfer.data_defaults(mcfg, DataConfig(image_size=64, mean=(0.5,), std=(0.2,))) == {"eval_resize_size": 73}
