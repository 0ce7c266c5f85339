"""Ready-made models by name, each a few lines on top of the layer-list builder or torchvision."""
from __future__ import annotations

from torch import nn

from cnnlab.models import MODELS
from cnnlab.models.layers import build_layers


@MODELS.register("lenet5")
def lenet5(*, num_classes: int, in_channels: int, input_size: int, batchnorm: bool = False) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) on 32x32 inputs (28x28 gets padding 2 in the first conv)."""
    pad = 2 if input_size == 28 else 0
    bn = ["batchnorm"] if batchnorm else []
    return build_layers(
        [{"conv": {"out": 6, "k": 5, "padding": pad}}, *bn, "relu", {"maxpool": 2},
         {"conv": {"out": 16, "k": 5}}, *bn, "relu", {"maxpool": 2},
         "flatten", {"linear": 120}, "relu", {"linear": 84}, "relu", {"linear": "classes"}],
        num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@MODELS.register("resnet18")
def resnet18(*, num_classes: int, in_channels: int, input_size: int, cifar_stem: bool | None = None) -> nn.Module:
    """torchvision's ResNet-18; `cifar_stem` (default: inputs below 64 px) swaps the 7x7/2 conv and
    max-pool for a 3x3/1 conv, as is usual for 32x32 images."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    if cifar_stem is None:
        cifar_stem = input_size < 64
    if cifar_stem or in_channels != 3:
        k, s, p = (3, 1, 1) if cifar_stem else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=k, stride=s, padding=p, bias=False)
    if cifar_stem:
        model.maxpool = nn.Identity()
    return model
