"""RD4AD (Deng & Li, CVPR 2022): teacher -> one-class bottleneck -> student decoder, cosine KD loss."""

from dataclasses import dataclass
from typing import ClassVar

from dmgrd.models.config import ModelConfig
from dmgrd.models.reverse_distillation import ReverseDistillation


@dataclass
class RD4ADConfig(ModelConfig):
    """RD4AD settings. ``official``: flattened KD loss, max score and a constant learning rate, as the authors'
    code (SPEC §1); ``clean`` adds the warm-up + cosine schedule."""

    PRESETS: ClassVar[dict] = {"clean": {}, "official": {"schedule": "constant"}}


class RD4AD(ReverseDistillation):
    """Reverse distillation baseline: ``dmgrd.RD4AD(backbone=..., weights=..., preset=..., image_size=...)``; the
    core as it is (:class:`~dmgrd.models.reverse_distillation.ReverseDistillation`)."""

    method = "rd4ad"
    config_class = RD4ADConfig
    config: RD4ADConfig
