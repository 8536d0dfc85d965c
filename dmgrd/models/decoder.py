"""Student decoder: the teacher's stages mirrored, upsampling from the bottleneck code to three levels."""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dmgrd.models.resnet_blocks import decoder_stage


class StudentDecoder(nn.Module):
    """Three upsampling stages producing the teacher's channels, returned finest first like the teacher.

    ``blocks`` counts blocks per stage from the coarsest (WRN50: [3, 4, 6], the published ``de_wide_resnet50_2``).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], block: str = "bottleneck",
                 blocks: tuple[int, ...] = (3, 4, 6), width_mult: int = 1):
        super().__init__()
        c1, c2, c3 = channels
        self.stage3 = decoder_stage(block, in_channels, c3, blocks[0], width_mult)
        self.stage2 = decoder_stage(block, c3, c2, blocks[1], width_mult)
        self.stage1 = decoder_stage(block, c2, c1, blocks[2], width_mult)

    def forward(self, code: torch.Tensor,
                after_stage: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """[S1, S2, S3] from the bottleneck code. ``after_stage`` (one callable per level, finest first like the
        output) transforms each stage's output before it is returned and fed to the next stage (MemKD's
        normality-recall memories); None leaves the stages as they are."""
        f1, f2, f3 = after_stage if after_stage is not None else (_identity,) * 3
        s3 = f3(self.stage3(code))
        s2 = f2(self.stage2(s3))
        return [f1(self.stage1(s2)), s2, s3]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
