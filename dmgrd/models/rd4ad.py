"""RD4AD (Deng & Li, CVPR 2022): teacher -> one-class bottleneck -> student decoder, cosine KD loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dmgrd.losses import kd_loss
from dmgrd.models.base import AnomalyModel, ModelConfig
from dmgrd.models.bottleneck import OCBE
from dmgrd.models.decoder import StudentDecoder


@dataclass
class RD4ADConfig(ModelConfig):
    """RD4AD settings. ``official``: flattened KD loss, max score and a constant learning rate, as the authors'
    code (SPEC §1); ``clean`` adds the warm-up + cosine schedule."""

    PRESETS: ClassVar[dict] = {"clean": {}, "official": {"schedule": "constant"}}


class ReverseDistillation(AnomalyModel):
    """Teacher plus a bottleneck (``bottleneck_class``, OCBE by default) and the student decoder, shaped from
    the teacher's channels."""

    bottleneck_class: ClassVar[type[nn.Module]] = OCBE

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        spec = self.teacher.decoder_spec
        channels = self.teacher.channels
        embed_blocks = 3 if spec.block == "bottleneck" else 2
        self.bottleneck = self.bottleneck_class(channels, spec.block, embed_blocks, spec.width_multiplier)
        self.decoder = StudentDecoder(self.bottleneck.out_channels, channels, spec.block, tuple(spec.blocks),
                                      spec.width_multiplier)

    def decode(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student pyramid from (possibly fused) teacher-shaped features."""
        return self.decoder(self.bottleneck(feats))


class RD4AD(ReverseDistillation):
    """Reverse distillation baseline: ``dmgrd.RD4AD(backbone=..., weights=..., preset=..., image_size=...)``."""

    method = "rd4ad"
    config_class = RD4ADConfig

    def __init__(self, backbone: str = "wide_resnet50_2", weights: str | None = "imagenet", preset: str = "clean",
                 image_size: int | tuple[int, int] = 256, *, config: RD4ADConfig | None = None, **overrides):
        if config is None:
            config = RD4ADConfig.from_preset(preset, backbone=backbone, weights=weights, image_size=image_size,
                                             **overrides)
        super().__init__(config)

    def student_features(self, teacher_feats):
        return self.decode(teacher_feats)

    def training_losses(self, images, generator):
        teacher_feats = self.teacher(images)
        kd = kd_loss(teacher_feats, self.decode(teacher_feats), self.config.kd_reduction)
        return {"loss": kd, "kd": kd}
