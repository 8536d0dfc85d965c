"""RD++ feature projections (SPEC §3.2): one trainable bottleneck of 3x3 convolutions per teacher level."""

from itertools import pairwise

import torch
from torch import nn


class ProjLayer(nn.Sequential):
    """Four 3x3 convolutions C -> C/2 -> C/4 -> C/2 -> C, each followed by ``InstanceNorm2d`` (no affine, no
    running statistics) and ``LeakyReLU(0.01)``, the last one included. Keeps the shape of its input."""

    def __init__(self, channels: int):
        if channels < 4:
            raise ValueError(f"a projection needs at least 4 channels, got {channels}")
        widths = (channels, channels // 2, channels // 4, channels // 2, channels)
        layers = []
        for c_in, c_out in pairwise(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.01)]
        super().__init__(*layers)


class MultiProjection(nn.Module):
    """A :class:`ProjLayer` per teacher level: ``[F1, F2, F3] -> [P1(F1), P2(F2), P3(F3)]``
    (WRN50 channels 256/512/1024: 15.5 M parameters)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.levels = nn.ModuleList(ProjLayer(c) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [project(f) for project, f in zip(self.levels, feats, strict=True)]
