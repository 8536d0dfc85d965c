"""Bottlenecks that fuse the teacher pyramid into one compact code: RD4AD's one-class bottleneck embedding
(OCBE) and DRD's multi-feature cascade fusion (MFCF)."""

import torch
from torch import nn

from dmgrd.models.resnet_blocks import encoder_stage


def _down(in_channels: int, out_channels: int, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """A bottleneck fusing the teacher pyramid into one code of ``out_channels`` channels at stride 32."""

    out_channels: int


class OCBE(Bottleneck):
    """Multi-scale feature fusion (levels 1 and 2 strided down to level 3) then one-class embedding blocks.

    For channels (c1, c2, c3) at strides (4, 8, 16) the output is ``2 * c3`` channels at stride 32
    (WRN50: 2048 x 8 x 8). Unlike the official code it has no unused ``conv4``/``bn4``.
    """

    def __init__(self, channels: tuple[int, ...], block: str = "bottleneck", blocks: int = 3, width_mult: int = 1):
        super().__init__()
        c1, c2, c3 = channels
        self.level1 = nn.Sequential(_down(c1, c2), _down(c2, c3))
        self.level2 = _down(c2, c3)
        self.out_channels = 2 * c3
        self.embed = encoder_stage(block, 3 * c3, self.out_channels, blocks, width_mult)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        return self.embed(torch.cat([self.level1(f1), self.level2(f2), f3], dim=1))


class MFCF(Bottleneck):
    """DRD's multi-feature cascade fusion (SPEC §7.4), a drop-in for :class:`OCBE` with the same arguments.

    Each level is strided down and concatenated with the next one: ``x = down(F1)`` (c1 -> c2), then
    ``down([x, F2])`` (2 c2 -> 2 c3), then a stride-1 conv of ``[that, F3]`` (3 c3 -> c3), then ``blocks``
    one-class embedding blocks (c3 -> 2 c3, the first with stride 2). The output is OCBE's: ``2 * c3``
    channels at stride 32 (WRN50: 2048 x 8 x 8, 90.3 M parameters). No unused ``conv4``/``bn4``.
    """

    def __init__(self, channels: tuple[int, ...], block: str = "bottleneck", blocks: int = 3, width_mult: int = 1):
        super().__init__()
        c1, c2, c3 = channels
        self.level1 = _down(c1, c2)
        self.level2 = _down(2 * c2, 2 * c3)
        self.level3 = _down(3 * c3, c3, stride=1)
        self.out_channels = 2 * c3
        self.embed = encoder_stage(block, c3, self.out_channels, blocks, width_mult)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        x = self.level2(torch.cat([self.level1(f1), f2], dim=1))
        return self.embed(self.level3(torch.cat([x, f3], dim=1)))
