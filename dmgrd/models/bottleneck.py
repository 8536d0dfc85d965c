"""One-class bottleneck embedding (RD4AD's OCBE): fuse the teacher pyramid into one compact code."""

from __future__ import annotations

import torch
from torch import nn

from dmgrd.models.resnet_blocks import encoder_stage


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class OCBE(nn.Module):
    """Multi-scale feature fusion (levels 1 and 2 strided down to level 3) then one-class embedding blocks.

    For channels (c1, c2, c3) at strides (4, 8, 16) the output is ``2 * c3`` channels at stride 32
    (WRN50: 2048 x 8 x 8). Unlike the official code it has no unused ``conv4``/``bn4``.
    """

    def __init__(self, channels: tuple[int, int, int], block: str = "bottleneck", blocks: int = 3, width_mult: int = 1):
        super().__init__()
        c1, c2, c3 = channels
        self.level1 = nn.Sequential(_down(c1, c2), _down(c2, c3))
        self.level2 = _down(c2, c3)
        self.out_channels = 2 * c3
        self.embed = encoder_stage(block, 3 * c3, self.out_channels, blocks, width_mult)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        return self.embed(torch.cat([self.level1(f1), self.level2(f2), f3], dim=1))
