"""DRD (Ge et al., Neurocomputing 2025): dual reverse distillation with a multi-feature cascade fusion.

Two branches share the frozen teacher, the MFCF bottleneck and the student decoder: the normal branch decodes
the teacher pyramid of each training image, the pseudo-anomalous branch decodes the pyramid of a self
cut-paste version of it with Gaussian feature noise added, and must restore the clean image's features.
The cosine map of that branch is pulled towards the pasted region (L_Seg). At inference the map is the
standard one and the image score is refined by the most uniform level (SPEC §7). ``preset="official"``
reproduces the authors' code; ``preset="clean"`` (default) is the principled version.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dmgrd import ops
from dmgrd.losses import COS_CHAN_MODES, cos_chan, kd_loss, seg_l1
from dmgrd.models.bottleneck import MFCF
from dmgrd.models.config import ModelConfig
from dmgrd.models.reverse_distillation import ReverseDistillation
from dmgrd.models.teacher import split_batch
from dmgrd.ops.anomaly_map import cosine_distance_reference
from dmgrd.ops.image_score import MODES as IMAGE_SCORE_MODES
from dmgrd.synthesis import color_distance, self_cutpaste

SEG_TARGETS = ("noisy", "clean")
MASKS = ("soft", "binary_paste")
PATCH_DRAWS = ("batch", "sample")
IMAGE_SCORES = (*IMAGE_SCORE_MODES, "drd_refined")


@dataclass
class DRDConfig(ModelConfig):
    """DRD settings; every preset trains with Adam (weight decay ``1e-5``) on ``L_KD + L_Rec + L_Seg`` and
    scores images with ``image_score="drd_refined"``.

    ``L_KD = kd_loss(F, S, kd_reduction) + cos_chan(F, S, individual)`` (``kd_reduction="pixel"`` is the
    paper's batch-level term), ``L_Rec = cos_chan(F, Sa, individual)`` where ``Sa`` is decoded from the
    pseudo-anomalous pyramid plus ``feature_noise`` Gaussian noise, and ``L_Seg = seg_weight * mean|A - M|``
    with ``A`` the level mean of that branch's cosine maps and ``M`` the ``mask``. Pastes add
    ``paste_strength`` times the destination.

    ``official`` preset (the authors' code): ``seg_target="noisy"`` (the feature noise is added in place, so
    the noisy pyramid is also the teacher side of the L_Seg map), ``individual="channel"`` (per-channel spatial
    cosines, what their per-image loss computes on a tensor), ``patch_draw="batch"`` (one patch size per
    batch), and a constant learning rate (``schedule="constant"``: their training loop has no scheduler).

    ``clean`` preset: ``seg_target="clean"`` (the map compares the restoring branch with the teacher pyramid
    of the pseudo-anomalous image itself), ``individual="flatten"`` (the per-image cosine over C·H·W that the
    reused RD4AD loss was written for), ``patch_draw="sample"`` (one patch size per image), and the library's
    warm-up + cosine schedule.

    Both use ``mask="soft"`` (``1 - cos_RGB`` of the normalised images, SPEC §7.2): the restoring branch
    reproduces the clean features, so its map can only be large where the paste changed the image; the soft
    mask asks for exactly that, while ``"binary_paste"`` also asks for a full response where a patch landed on
    identical content, a target that contradicts L_Rec. Deviations in both presets: the teacher is frozen
    under ``no_grad``; the patch never shrinks by the official parity quirk; patch sizes (given for 256
    pixels) scale with the image; the pixel map is the library's (levels summed, then blurred; the official
    mean is a third of it, with the same AUROC) while the refined score uses the mean as published; the
    feature noise is drawn on the features' device from a generator seeded by the step's.
    """

    kd_reduction: str = "pixel"
    image_score: str = "drd_refined"
    weight_decay: float = 1e-5
    individual: str = "flatten"
    seg_target: str = "clean"
    mask: str = "soft"
    patch_draw: str = "sample"
    paste_strength: float = 0.2
    feature_noise: float = 0.1
    seg_weight: float = 0.1

    PRESETS: ClassVar[dict] = {
        "clean": {},
        "official": {
            "individual": "channel",
            "seg_target": "noisy",
            "patch_draw": "batch",
            "schedule": "constant",
        },
    }

    CHOICES: ClassVar[dict] = {
        **ModelConfig.CHOICES,
        "map_reduce": ("sum", "mean"),  # the refined score needs the mean of the levels' maps
        "image_score": IMAGE_SCORES,
        "individual": COS_CHAN_MODES,
        "seg_target": SEG_TARGETS,
        "mask": MASKS,
        "patch_draw": PATCH_DRAWS,
    }


def refined_score(mean_map: torch.Tensor, teacher_feats: list[torch.Tensor],
                  student_feats: list[torch.Tensor]) -> torch.Tensor:
    """DRD's image score ``[B]`` (SPEC §7.7): ``(1 + max A_l*) * max(mean_map)``.

    ``A_l = 1 - cos_c(F_l, S_l)`` at the level's resolution; ``l*`` has the smallest unbiased variance of
    ``A_l`` bilinearly resized (``align_corners=True``) to the map's size; ``mean_map`` is the blurred mean
    of the levels ``[B, 1, H, W]``.
    """
    pairs = zip(teacher_feats, student_feats, strict=True)
    levels = [cosine_distance_reference(t, s)[:, None] for t, s in pairs]  # B 1 h w
    size = mean_map.shape[-2:]
    resized = [F.interpolate(a, size=size, mode="bilinear", align_corners=True) for a in levels]
    chosen = torch.stack([r.flatten(1).var(dim=1) for r in resized]).argmin(0)
    peak = torch.stack([a.flatten(1).amax(1) for a in levels]).gather(0, chosen[None])[0]
    return (1 + peak) * mean_map.flatten(1).amax(1)


def _generator_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """``generator`` if it lives on ``device``, else a new one there seeded from it."""
    if device == generator.device:
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


class DRD(ReverseDistillation):
    """``dmgrd.DRD(backbone="wide_resnet50_2", weights="imagenet", preset="clean", image_size=256, **options)``;
    options are the fields of :class:`DRDConfig`."""

    method = "drd"
    config_class = DRDConfig
    config: DRDConfig
    bottleneck_class = MFCF

    def optimizer_groups(self):
        return [{"params": self.trainable_parameters(), "lr_scale": 1.0, "weight_decay": self.config.weight_decay}]

    def image_scores(self, maps, teacher_feats, student_feats):
        if self.config.image_score != "drd_refined":
            return super().image_scores(maps, teacher_feats, student_feats)
        mean_map = maps if self.config.map_reduce == "mean" else maps / len(teacher_feats)
        return refined_score(mean_map, teacher_feats, student_feats)

    def pseudo_anomalies(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Self cut-paste versions of ``images`` and the masks ``[B, 1, H, W]`` their L_Seg map should match."""
        cfg = self.config
        augmented, pasted = self_cutpaste(images, generator, per_sample=cfg.patch_draw == "sample",
                                          strength=cfg.paste_strength)
        if cfg.mask == "binary_paste":
            return augmented, pasted
        return augmented, color_distance(augmented, images, self.teacher.mean, self.teacher.std)

    def training_losses(self, images, generator):
        cfg = self.config
        augmented, mask = self.pseudo_anomalies(images, generator)
        feats, feats_aug = split_batch(self.teacher(torch.cat([images, augmented])), images.shape[0])
        noise_generator = _generator_on(feats[0].device, generator)
        noisy = [f + cfg.feature_noise * torch.randn(f.shape, generator=noise_generator, device=f.device,
                                                     dtype=f.dtype) for f in feats_aug]
        student, restored = self.decode(feats), self.decode(noisy)
        seg_feats = noisy if cfg.seg_target == "noisy" else feats_aug
        seg_map = ops.anomaly_map(seg_feats, restored, cfg.size, reduce="mean", sigma=0)
        kd = kd_loss(feats, student, cfg.kd_reduction) + cos_chan(feats, student, cfg.individual)
        rec = cos_chan(feats, restored, cfg.individual)
        seg = cfg.seg_weight * seg_l1(seg_map, mask)
        return {"loss": kd + rec + seg, "kd": kd, "rec": rec, "seg": seg}
