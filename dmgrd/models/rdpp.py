"""RD++ (Tran et al., CVPR 2023, "Revisiting Reverse Distillation"): reverse distillation through trainable
feature projections, trained with simplex-noise patches and multi-task projection losses (SPEC §3).

A clean image and a copy with one simplex-noise rectangle both go through the frozen teacher; one projection
per level maps both pyramids. The student decodes the projected clean pyramid (through OCBE) and is trained to
reproduce the clean teacher features. The projections are also trained to bring the noisy projection back to
the clean one (L_recon), to push the projected clean features away from the raw noisy ones (L_con), and to make
the projected feature distributions of different images alike (L_ssot, optimal transport).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from dmgrd.losses import SSOT_MODES, contrast_loss, kd_loss, ssot_loss
from dmgrd.models.config import ModelConfig
from dmgrd.models.projection import MultiProjection
from dmgrd.models.reverse_distillation import ReverseDistillation
from dmgrd.models.teacher import split_batch
from dmgrd.synthesis import simplex_patch, simplex_permutations

NOISE_FIELDS = ("per_sample", "fixed")
NOISE_SIZES = (10, 31)  # rectangle sides in pixels, inclusive (the official np.random.randint(10, 256 // 8))


@dataclass
class RDPPConfig(ModelConfig):
    """RD++ settings. The loss is ``L_KD + projection_weight * (L_ssot + recon_weight * L_recon + contrast_weight
    * L_con) / (1 + recon_weight + contrast_weight)`` (officially 0.2, 0.01, 0.1: the code's ``/ 1.11``), with
    L_con comparing the *unprojected* noisy teacher feature with the projected clean one (as the code does; the
    projected noisy one would fight L_recon) as ``mean_b max(0, cos - contrast_margin)`` (CosineEmbeddingLoss,
    target -1, margin 0.5 per SPEC §3.4; versions of the authors' code have margin -0.5 or target +1).
    Projections train at ``projection_lr``, OCBE and decoder at ``lr``.
    Noise rectangles have sides U{10..31} pixels (at most ``min(H, W) - 2`` for small images).

    ``official`` preset (the authors' code): ``ssot="legacy"`` (one batch-level OT problem between a batch and
    its own permutation: numerically zero, no gradient), ``noise_field="fixed"`` (one simplex field for the
    whole run, so every noise patch is a crop of the same pattern), and a constant learning rate
    (``schedule="constant"``: no scheduler in the code).

    ``clean`` preset: ``ssot="sinkhorn"`` (one OT problem per sample between its L2-normalised projected pixels,
    up to ``ssot_points`` of them, and another sample's; SPEC §3.4), a fresh noise field per image, and the
    engine's warm-up + cosine schedule.

    Both: the effective batch is the batch size. The official "gradient accumulation 2" zeroes the gradients
    before every backward, so it steps on every second batch of 16 alone and ignores the others; reproduce
    its step count with ``steps = epochs * (len(train) // 16) // 2`` at ``batch_size=16``.
    """

    ssot: str = "sinkhorn"
    ssot_points: int = 1024
    noise_field: str = "per_sample"
    projection_weight: float = 0.2
    recon_weight: float = 0.01
    contrast_weight: float = 0.1
    contrast_margin: float = 0.5
    projection_lr: float = 1e-3

    PRESETS: ClassVar[dict] = {
        "clean": {},
        "official": {"ssot": "legacy", "noise_field": "fixed", "schedule": "constant"},
    }

    CHOICES: ClassVar[dict] = {**ModelConfig.CHOICES, "ssot": SSOT_MODES, "noise_field": NOISE_FIELDS}


class RDPP(ReverseDistillation):
    """``dmgrd.RDPP(backbone="wide_resnet50_2", weights="imagenet", preset="clean", image_size=256, **options)``;
    options are the fields of :class:`RDPPConfig`. Inference: ``S = D(OCBE(P(F)))`` against the teacher's ``F``."""

    method = "rdpp"
    config_class = RDPPConfig
    config: RDPPConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.projection = MultiProjection(self.teacher.channels)
        self.noise_sizes = (NOISE_SIZES[0], min(NOISE_SIZES[1], min(self.config.size) - 2))
        self.noise_permutation: torch.Tensor | None = None

    def student_features(self, teacher_feats):
        return self.decode(self.projection(teacher_feats))

    def optimizer_groups(self):
        """OCBE and decoder at the scheduled lr; the projections at ``projection_lr`` (scaled alike)."""
        distill = [*self.bottleneck.parameters(), *self.decoder.parameters()]
        return [{"params": distill, "lr_scale": 1.0},
                {"params": list(self.projection.parameters()), "lr_scale": self.config.projection_lr / self.config.lr}]

    def prepare(self, train_data, generator, batch_size=8, build_memory=True):
        """Draw the run's simplex permutation table (``noise_field="fixed"``)."""
        if self.config.noise_field == "fixed":
            self.noise_permutation = simplex_permutations(1, generator)[0]

    def training_losses(self, images, generator):
        cfg = self.config
        if cfg.noise_field == "fixed" and self.noise_permutation is None:
            raise RuntimeError("call prepare() (done by fit()) before training with noise_field='fixed'")
        noisy, _ = simplex_patch(images, generator, self.noise_permutation, self.noise_sizes)
        feats = self.teacher(torch.cat([images, noisy]))  # one pass; instance norm keeps samples independent
        clean, noisy_feats = split_batch(feats, images.shape[0])
        projected, projected_noisy = split_batch(self.projection(feats), images.shape[0])
        kd = kd_loss(clean, self.decode(projected), cfg.kd_reduction)
        ssot = ssot_loss(projected, cfg.ssot, generator, cfg.ssot_points)
        recon = kd_loss(projected_noisy, projected, "pixel")  # Σ_l mean_{b,h,w} [1 - cos_c]
        contrast = contrast_loss(noisy_feats, projected, cfg.contrast_margin)
        proj = (ssot + cfg.recon_weight * recon + cfg.contrast_weight * contrast) / (
            1 + cfg.recon_weight + cfg.contrast_weight)
        loss = kd + cfg.projection_weight * proj
        return {"loss": loss, "kd": kd, "projection": proj, "ssot": ssot, "recon": recon, "contrast": contrast}

