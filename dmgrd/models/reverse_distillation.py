"""The reverse-distillation core every method builds on: frozen teacher -> bottleneck -> student decoder, scored
by the per-pixel cosine distance of teacher and student pyramids (:func:`dmgrd.ops.anomaly_map`)."""

from typing import Any, ClassVar

import torch
from torch import nn

from dmgrd import ops
from dmgrd.losses import kd_loss
from dmgrd.models.base import AnomalyModel
from dmgrd.models.bottleneck import OCBE, Bottleneck
from dmgrd.models.decoder import StudentDecoder


class ReverseDistillation(AnomalyModel):
    """Teacher plus a bottleneck (``bottleneck_class``, OCBE by default) and the student decoder, shaped from the
    teacher's channels. A method adds its own parts and overrides the hooks it changes: :meth:`student_features`
    (what the decoder sees at inference), :meth:`image_scores` and :meth:`training_losses` (RD4AD's KD loss here).
    """

    bottleneck_class: ClassVar[type[Bottleneck]] = OCBE
    bottleneck: Bottleneck

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        spec = self.teacher.decoder_spec
        channels = self.teacher.channels
        embed_blocks = 3 if spec.block == "bottleneck" else 2
        self.bottleneck = self.bottleneck_class(channels, spec.block, embed_blocks, spec.width_multiplier)
        self.decoder = StudentDecoder(self.bottleneck.out_channels, channels, spec.block, tuple(spec.blocks),
                                      spec.width_multiplier)

    def decode(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student pyramid from (possibly fused) teacher-shaped features."""
        return self.decoder(self.bottleneck(feats))

    def recomputed_modules(self) -> list[nn.Module]:
        """The bottleneck and each decoder stage."""
        return [self.bottleneck, self.decoder.stage3, self.decoder.stage2, self.decoder.stage1]

    def student_features(self, teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's reconstruction of the teacher pyramid at inference."""
        return self.decode(teacher_feats)

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_feats = self.teacher(images)
        student_feats = self.student_features(teacher_feats)
        cfg = self.config
        queries, references = self.compared_pairs(teacher_feats, student_feats)
        maps = ops.anomaly_map(queries, references, cfg.size, reduce=cfg.map_reduce, sigma=cfg.sigma)
        return maps, self.image_scores(maps, teacher_feats, student_feats)

    def compared_pairs(self, teacher_feats: list[torch.Tensor],
                       student_feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The feature pairs whose per-pixel cosine distances, summed, make the map: the teacher and student
        pyramids; a method may add pairs of its own."""
        return teacher_feats, student_feats

    def image_scores(self, maps: torch.Tensor, teacher_feats: list[torch.Tensor],
                     student_feats: list[torch.Tensor]) -> torch.Tensor:
        """Scores ``[B]`` of the blurred maps ``[B, 1, H, W]`` computed from these pyramids: the config's
        ``image_score`` over the map; methods with their own rule override this."""
        return ops.image_score(maps, self.config.image_score, self.config.topk)

    def training_losses(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        teacher_feats = self.teacher(images)
        kd = kd_loss(teacher_feats, self.decode(teacher_feats), self.config.kd_reduction)
        return {"loss": kd, "kd": kd}
