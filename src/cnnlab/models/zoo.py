"""Ready-made models by name, each a few lines on top of the layer-list builder or torchvision.

Every builder carries its default input shape: `default_input(name) -> (C, H, W)`.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from cnnlab.models._registry import MODELS, library_of
from cnnlab.models.layers import LayerSpecError, build_layers

FALLBACK_INPUT = (3, 32, 32)  # models that declare nothing (e.g. `layers`)
EXTERNAL_INPUT = (3, 224, 224)  # torchvision:<name> and timm:<name> were made for ImageNet


def takes_input(c: int, h: int, w: int | None = None) -> Callable[[Callable], Callable]:
    """Mark a builder with the (C, H, W) it was designed for; tests and `cnnlab summary` use it."""

    def deco(fn: Callable) -> Callable:
        fn.default_input = (c, h, w or h)
        return fn

    return deco


def default_input(name: str) -> tuple[int, int, int]:
    """The (C, H, W) a model name was designed for (the trainer uses the data's own shape instead)."""
    if library_of(name)[0] is not None:
        return EXTERNAL_INPUT
    return tuple(getattr(MODELS.get(name), "default_input", FALLBACK_INPUT))


FC_BN = ("none", "hidden", "all")


def _conv(out: int, k: int, padding: int, batchnorm: bool) -> list:
    return [{"conv": {"out": out, "k": k, "padding": padding}}, *(["batchnorm"] if batchnorm else []), "relu"]


def _drop(p: float) -> list:
    return [{"dropout": p}] if p else []


def classic(blocks: list[list[tuple[int, int, int]]], hidden: list[int], *, num_classes: int, in_channels: int,
            input_size: int, batchnorm: bool, batchnorm_fc: str | None, dropout: float, dropout_fc: float,
            fc_bn_default: str, tail: list | None = None) -> nn.Module:
    """The layer list every classic net shares, with its four switches placed the same way in each:

    blocks: [(out, k, padding), ...] per block, each block a run of conv(-BatchNorm2d)-ReLU then maxpool 2;
    `batchnorm`: BatchNorm2d after every conv, before its ReLU; `dropout`: Dropout(p) after every pool
    (the feature extractor); `batchnorm_fc`: BatchNorm1d after every hidden linear layer, before its ReLU
    ('hidden'), also after the last linear layer ('all'), or none; None = `fc_bn_default` when batchnorm is
    on, else none; `dropout_fc`: Dropout(p) after every hidden linear layer's ReLU.
    """
    fc_bn = (fc_bn_default if batchnorm else "none") if batchnorm_fc is None else str(batchnorm_fc)
    if fc_bn not in FC_BN:
        raise LayerSpecError(f"model.options.batchnorm_fc={batchnorm_fc!r} is not one of {', '.join(FC_BN)}")
    for key, p in (("model.dropout", dropout), ("model.options.dropout_fc", dropout_fc)):
        if not 0 <= p < 1:
            raise LayerSpecError(f"{key}={p!r}: must be in [0, 1)")
    specs: list = []
    for block in blocks:
        for out, k, pad in block:
            specs += _conv(out, k, pad, batchnorm)
        specs += [{"maxpool": 2}, *_drop(dropout)]
    specs += list(tail or []) + ["flatten"]
    for width in hidden:
        specs += [{"linear": width}, *(["batchnorm"] if fc_bn != "none" else []), "relu", *_drop(dropout_fc)]
    specs += [{"linear": "classes"}, *(["batchnorm"] if fc_bn == "all" else [])]
    return build_layers(specs, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


# ---- the 64x64 five-class nets: how padding and depth change the shape arithmetic


def _net(num_classes, in_channels, input_size, padding, batchnorm, dropout, batchnorm_fc=None, dropout_fc=0.0,
         extra=0) -> nn.Module:
    # net3: `extra` same-size 32->32 convs stacked after the last pool, before the classifier
    return classic([[(16, 3, padding)], [(32, 3, padding)]], [64], num_classes=num_classes, in_channels=in_channels,
                   input_size=input_size, batchnorm=batchnorm, batchnorm_fc=batchnorm_fc, dropout=dropout,
                   dropout_fc=dropout_fc, fc_bn_default="none",
                   tail=[x for _ in range(extra) for x in _conv(32, 3, 1, batchnorm)])


@MODELS.register("net1")
@takes_input(3, 64)
def net1(*, num_classes: int, in_channels: int, input_size: int, padding: int = 0, batchnorm: bool = False,
         dropout: float = 0.0, batchnorm_fc: str | None = None, dropout_fc: float = 0.0) -> nn.Module:
    """conv 16 k3 - relu - maxpool 2 - conv 32 k3 - relu - maxpool 2 - fc 64 - relu - fc classes.
    At 64x64 without padding: 64 -> 62 -> 31 -> 29 -> 14, flatten 32*14*14 = 6272."""
    return _net(num_classes, in_channels, input_size, padding, batchnorm, dropout, batchnorm_fc, dropout_fc)


@MODELS.register("net2")
@takes_input(3, 64)
def net2(*, num_classes: int, in_channels: int, input_size: int, padding: int = 1, batchnorm: bool = False,
         dropout: float = 0.0, batchnorm_fc: str | None = None, dropout_fc: float = 0.0) -> nn.Module:
    """net1 with padding 1: 64 -> 64 -> 32 -> 32 -> 16, flatten 32*16*16 = 8192."""
    return _net(num_classes, in_channels, input_size, padding, batchnorm, dropout, batchnorm_fc, dropout_fc)


@MODELS.register("net3")
@takes_input(3, 64)
def net3(*, num_classes: int, in_channels: int, input_size: int, padding: int = 1, batchnorm: bool = False,
         dropout: float = 0.0, batchnorm_fc: str | None = None, dropout_fc: float = 0.0,
         extra_convs: int = 10) -> nn.Module:
    """net2 with `extra_convs` (10) more conv 32->32 k3 p1 + relu layers before the classifier: depth
    without batchnorm, the classic case of a net that trains badly until `batchnorm: true`."""
    return _net(num_classes, in_channels, input_size, padding, batchnorm, dropout, batchnorm_fc, dropout_fc,
                extra=extra_convs)


# ---- CIFAR-10 classics


@MODELS.register("cifar_convnet")
@takes_input(3, 32)
def cifar_convnet(*, num_classes: int, in_channels: int, input_size: int, padding: int = 0,
                  batchnorm: bool = False, dropout: float = 0.0, batchnorm_fc: str | None = None,
                  dropout_fc: float = 0.0) -> nn.Module:
    """conv32-conv32-pool-conv64-conv64-pool-fc512-fc classes, 3x3 convs. 890,410 parameters at 3x32x32 and
    10 classes, which needs unpadded convs: 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5, flatten 64*5*5 = 1600
    (padding 1 would give 64*8*8 = 4096 and 2,168,362). `dropout` after each pool (the dropout sweep of
    experiment 3), `dropout_fc` after fc512's ReLU (its improved model)."""
    return classic([[(32, 3, padding), (32, 3, padding)], [(64, 3, padding), (64, 3, padding)]], [512],
                   num_classes=num_classes, in_channels=in_channels, input_size=input_size, batchnorm=batchnorm,
                   batchnorm_fc=batchnorm_fc, dropout=dropout, dropout_fc=dropout_fc, fc_bn_default="none")


@MODELS.register("cifar_5x5")
@takes_input(3, 32)
def cifar_5x5(*, num_classes: int, in_channels: int, input_size: int, padding: int = 2, batchnorm: bool = False,
              dropout: float = 0.0, batchnorm_fc: str | None = None, dropout_fc: float = 0.0) -> nn.Module:
    """Three blocks of 5x5 conv ('same' padding 2) + relu + maxpool 2 (32, 64, 128 channels), then
    fc 2048 -> 64 -> classes: 32 -> 16 -> 8 -> 4, flatten 128*4*4 = 2048; 390,410 parameters at 3x32x32/10.
    `batchnorm: true` is experiment 2's Network 1 (391,006): BatchNorm2d after each conv and BatchNorm1d after
    both linear layers (`options.batchnorm_fc: hidden` leaves the last one out); `dropout: 0.05` is its
    Network 2: Dropout after each pool, none in the classifier."""
    return classic([[(32, 5, padding)], [(64, 5, padding)], [(128, 5, padding)]], [64], num_classes=num_classes,
                   in_channels=in_channels, input_size=input_size, batchnorm=batchnorm, batchnorm_fc=batchnorm_fc,
                   dropout=dropout, dropout_fc=dropout_fc, fc_bn_default="all")


@MODELS.register("lenet5")
@takes_input(1, 32)
def lenet5(*, num_classes: int, in_channels: int, input_size: int, batchnorm: bool = False,
           dropout: float = 0.0, batchnorm_fc: str | None = None, dropout_fc: float = 0.0) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) on 32x32 inputs (28x28 gets padding 2 in the first conv): conv6 k5 - relu -
    pool - conv16 k5 - relu - pool - fc120 - relu - fc84 - relu - fc classes; 62,006 parameters on 3x32x32.
    `batchnorm: true` is experiment 4's batch-norm LeNet (62,458 on 3x32x32): BatchNorm2d after each conv,
    BatchNorm1d after fc120 and fc84 (before their ReLUs)."""
    pad = 2 if input_size == 28 else 0
    return classic([[(6, 5, pad)], [(16, 5, 0)]], [120, 84], num_classes=num_classes, in_channels=in_channels,
                   input_size=input_size, batchnorm=batchnorm, batchnorm_fc=batchnorm_fc, dropout=dropout,
                   dropout_fc=dropout_fc, fc_bn_default="hidden")


# ---- torchvision architectures adapted to small inputs


@MODELS.register("resnet18")
@takes_input(3, 32)
def resnet18(*, num_classes: int, in_channels: int, input_size: int, cifar_stem: bool | None = None) -> nn.Module:
    """torchvision's ResNet-18; `cifar_stem` (default: inputs below 64 px) swaps the 7x7/2 conv and
    max-pool for a 3x3/1 conv, as is usual for 32x32 images; `cifar_stem: false` keeps the ImageNet stem
    (use it with ImageNet weights)."""
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


def _vgg(arch: str, num_classes: int, in_channels: int, input_size: int, dropout: float,
         small_head: bool | None) -> nn.Module:
    from torchvision.models import get_model

    if input_size < 32:
        raise ValueError(f"model {arch!r}: input_size={input_size} is too small; its five 2x2 max-pools "
                         "need at least 32x32 (set data.image_size: 32)")
    model = get_model(arch, num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    if small_head if small_head is not None else input_size < 64:
        # 32x32 leaves 512x1x1 after the five pools: torchvision's 7x7 average pool would copy it 49
        # times into a 25088 -> 4096 -> 4096 classifier (120M parameters). One linear layer suffices.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(*_drop_module(dropout), nn.Linear(512, num_classes))
    return model


def _drop_module(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p else []


@MODELS.register("vgg11_bn")
@takes_input(3, 32)
def vgg11_bn(*, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5,
             small_head: bool | None = None) -> nn.Module:
    """torchvision's VGG-11 with batchnorm; below 64 px (`small_head`) global pooling + one linear head."""
    return _vgg("vgg11_bn", num_classes, in_channels, input_size, dropout, small_head)


@MODELS.register("vgg16_bn")
@takes_input(3, 32)
def vgg16_bn(*, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5,
             small_head: bool | None = None) -> nn.Module:
    """torchvision's VGG-16 with batchnorm; below 64 px (`small_head`) global pooling + one linear head."""
    return _vgg("vgg16_bn", num_classes, in_channels, input_size, dropout, small_head)
