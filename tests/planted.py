"""Nets with a planted fault, shared by the tests that check how training meets it."""
from __future__ import annotations

from torch import nn


class NanAt(nn.Module):
    """`net`, except that its `at`-th training forward returns NaN (evaluation is never touched)."""

    def __init__(self, net: nn.Module, at: int):
        super().__init__()
        self.net, self.at, self.calls = net, at, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                return out * float("nan")
        return out
