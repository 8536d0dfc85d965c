"""Student decoder: the teacher's stages mirrored, upsampling from the bottleneck code to three levels."""

from __future__ import annotations

import torch
from torch import nn

from dmgrd.models.resnet_blocks import decoder_stage


class StudentDecoder(nn.Module):
    """Three upsampling stages producing the teacher's channels, returned finest first like the teacher.

    ``blocks`` counts blocks per stage from the coarsest (WRN50: [3, 4, 6], the published ``de_wide_resnet50_2``).
    """

    def __init__(self, in_channels: int, channels: tuple[int, int, int], block: str = "bottleneck",
                 blocks: tuple[int, int, int] = (3, 4, 6), width_mult: int = 1):
        super().__init__()
        c1, c2, c3 = channels
        self.stage3 = decoder_stage(block, in_channels, c3, blocks[0], width_mult)
        self.stage2 = decoder_stage(block, c3, c2, blocks[1], width_mult)
        self.stage1 = decoder_stage(block, c2, c1, blocks[2], width_mult)

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        s3 = self.stage3(code)
        s2 = self.stage2(s3)
        return [self.stage1(s2), s2, s3]
