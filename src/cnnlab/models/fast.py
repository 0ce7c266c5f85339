"""`fastnet`: a small, fast CIFAR network in the spirit of airbench94 (Keller Jordan, 2024).

A frozen 2x2 patch-whitening stem initialised from the training images (the eigenvectors of their
patch covariance, +/-, as in airbench), three conv groups (conv -> max-pool -> BN -> GELU -> conv ->
BN -> GELU) with identity (dirac) initialised convs, a global max-pool and a scaled linear head.
The stem needs data: FastNet is a `hooks.InitFromData`, so the loop calls `init_from_data(x)` with
normalised training images before training starts. The stem's bias starts at zero and, with
`whiten_bias_epochs` = N, trains for the first N epochs and is then frozen (airbench: about 8% less step
compute): FastNet is a `hooks.BeforeEpoch`, and the loop calls `before_epoch(epoch)` as each epoch starts.
"""
from __future__ import annotations

import torch
from torch import nn

from cnnlab.models._registry import MODELS
from cnnlab.config import ConfigError
from cnnlab.models.hooks import BeforeEpoch, InitFromData
from cnnlab.models.zoo import takes_input


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)
        with torch.no_grad():  # dirac: the first cin filters start as the identity
            torch.nn.init.dirac_(self.weight[: min(cin, cout)])


class _BN(nn.BatchNorm2d):
    """BatchNorm without a learnable scale (airbench: weight frozen at 1), fast running statistics."""

    def __init__(self, c: int, momentum: float = 0.6):
        super().__init__(c, eps=1e-12, momentum=1 - momentum)
        self.weight.requires_grad_(False)


class _Group(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.pool, self.norm1 = _Conv(cin, cout), nn.MaxPool2d(2), _BN(cout)
        self.conv2, self.norm2, self.act = _Conv(cout, cout), _BN(cout), nn.GELU()

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H/2, W/2)
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(InitFromData, BeforeEpoch, nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths=(64, 256, 256), scale: float = 1 / 9,
                 whiten_bias_epochs: int | None = None):
        super().__init__()
        k = 2
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * k * k, kernel_size=k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data, then frozen
        nn.init.zeros_(self.whiten.bias)  # (airbench's Conv zeroes its bias)
        self.whiten_bias_epochs = whiten_bias_epochs  # None: the bias trains throughout
        self.groups = nn.Sequential(
            _Group(self.whiten.out_channels, widths[0]), _Group(widths[0], widths[1]), _Group(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale

    def forward(self, x):  # (B, C, 32, 32)
        x = nn.functional.gelu(self.whiten(x))  # (B, 24, 31, 31)
        x = self.groups(x)  # (B, w3, 3, 3)
        x = torch.amax(x, dim=(2, 3))  # global max-pool (B, w3)
        return self.head(x) * self.scale

    def before_epoch(self, epoch: int) -> None:
        """The whitening bias trains in epochs 0 .. whiten_bias_epochs - 1, then is frozen."""
        if self.whiten_bias_epochs is not None:
            self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening stem from the patch covariance of normalised training images x (N, C, H, W)."""
        w = self.whiten.weight
        c, kh, kw = w.shape[1:]
        patches = x.float().unfold(2, kh, 1).unfold(3, kw, 1).transpose(1, 3).reshape(-1, c * kh * kw)
        cov = patches.T @ patches / len(patches)
        evals, evecs = torch.linalg.eigh(cov.double())
        evals, evecs = evals.flip(0).float(), evecs.T.flip(0).float()
        filt = (evecs / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(-1, c, kh, kw)
        w.copy_(torch.cat([filt, -filt]).to(w))


@MODELS.register("fastnet")
@takes_input(3, 32)
def fastnet(*, num_classes: int, in_channels: int, input_size: int, widths: list | None = None,
            scale: float = 1 / 9, whiten_bias_epochs: int | None = None) -> nn.Module:
    """airbench-style CIFAR net (widths 64/256/256 by default; `options: {widths: [32, 128, 128]}` for a
    smaller, faster one). Whitening stem set from the data before training; `whiten_bias_epochs: N`
    freezes its bias after N epochs (airbench: 3; null = it trains throughout)."""
    if whiten_bias_epochs is not None and (isinstance(whiten_bias_epochs, bool) or not isinstance(whiten_bias_epochs, int)
                                           or whiten_bias_epochs < 0):
        raise ConfigError(f"model.options.whiten_bias_epochs={whiten_bias_epochs!r}: must be a whole number "
                               ">= 0 (epochs the whitening bias trains before it is frozen) or null")
    return FastNet(num_classes, in_channels, tuple(widths or (64, 256, 256)), scale, whiten_bias_epochs)
