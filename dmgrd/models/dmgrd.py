"""DM-GRD (Tran et al., ACCV 2024): reverse distillation guided by a normal and an abnormal memory bank.

Training images are mixed with pseudo-anomalies (Fourier amplitude mixing with a texture inside a Perlin
mask); each teacher pyramid is compared with its selected item of both banks, the memory-guided features
are fused by MSFF, and the student decodes the normal-bank fusion. Separation terms push the two fusions
apart. ``preset="official"`` reproduces every number-changing behaviour of the authors' code;
``preset="clean"`` (default) is the principled version (SPEC §4, §5).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dmgrd.data.textures import load_textures
from dmgrd.losses import SSOT_MODES, contrast_loss, kd_loss, memory_margin_loss, ssot_loss, triplet_loss
from dmgrd.models.config import ModelConfig
from dmgrd.models.fusion import ATTENTION_MODES, MSFF, GuidedProjection
from dmgrd.models.memory import MEMORY_KINDS, SELECTIONS, MemoryBank, PatchMemoryBank, Selection, guided_input
from dmgrd.models.reverse_distillation import ReverseDistillation
from dmgrd.models.teacher import split_batch
from dmgrd.synthesis import BLEND_MODES, SHAPES, AnomalySynthesizer, procedural_textures

KD_TARGETS = ("input", "clean")
SAMPLE_ORDERS = ("random", "alternate")
TRIPLET_MODES = ("embedding", "memory", "legacy", "off")
# Parts an ablation can switch off (``ablate``); the other ablations are settings of their own: ``triplet="off"``,
# ``blend``, ``memory="patch"``, ``memory_map_levels=()``.
ABLATIONS = ("normal_memory", "abnormal_memory", "msff")


@dataclass
class DMGRDConfig(ModelConfig):
    """DM-GRD settings.

    ``official`` preset (the authors' code): ``selection="legacy"`` (always the same memory item),
    ``blend="dmgrd_legacy"`` (brightens everything outside the mask), ``ssot="legacy"`` (identically 0),
    ``triplet="legacy"`` (constant 3.0, no gradient), ``image_score="topk_mean"`` (top-100 mean),
    ``kd_target="input"`` (the student imitates the teacher on the pseudo-anomalous image), dot-product
    non-local attention, and normal/augmented samples alternating. Its effective objective is
    ``L_KD + 0.02 * L_con`` (+ the constant 0.3).

    ``clean`` preset: nearest memory item by L2 distance, DRAEM blending, one Sinkhorn OT problem per
    sample, the embedding triplet, ``kd_target="clean"`` (restore the clean teacher features),
    softmax non-local attention through ``scaled_dot_product_attention``, Bernoulli(0.5) augmentation, and
    ``memory_map_levels=(3,)``: the normal memory also scores the map directly (on KolektorSDD at 640x256, 3
    seeds, image AUROC 0.76 -> 0.86 and AUPRO@0.3 0.56 -> 0.63; docs/results.md).

    ``light`` preset: the clean preset without MSFF (``ablate=("msff",)``, a 1x1 convolution per level fuses the
    guided input). On KolektorSDD at 640x256 (3 seeds) it scores as the clean preset within one seed std (image
    AUROC 0.871 vs 0.858, AUPRO@0.3 0.631 vs 0.629) and trains in about a third of the time (docs/results.md).

    Options beyond the paper (defaults off in both presets, but for the clean preset's ``memory_map_levels``):
    ``memory="patch"`` compares every pixel with its nearest normal (abnormal) memory *patch*, PatchCore-style,
    instead of the whole pyramid with one selected memory image (:class:`~dmgrd.models.memory.PatchMemoryBank`);
    ``coreset_ratio`` < 1 keeps a greedy k-center coreset of each level's patches (built once in ``prepare``,
    saved with the model), selected in a ``coreset_projection``-dimensional random projection.
    ``triplet="memory"``: for each training input (clean or augmented; both are reconstructed as normal) the
    student output's L2-normalised GAP vector ``s_l`` should be nearer to the normal than to the abnormal
    memory: ``sum_l mean_b relu(d(s_l, nearest normal item) - d(s_l, nearest abnormal item) + triplet_margin)``
    over the normalised GAP vectors of the memory items, with ``d`` the squared L2 distance of unit vectors,
    ``2 (1 - cos)`` (:func:`~dmgrd.losses.memory_margin_loss`). ``triplet_margin`` is the margin of every
    triplet mode (the official constant is ``num_levels * triplet_margin``).

    ``memory_map_levels``: teacher levels (1 finest) at which the anomaly map also adds, per pixel, the cosine
    distance of the 3x3-averaged teacher feature to its nearest 3x3-averaged patch of the normal memory
    (:meth:`~dmgrd.models.memory.MemoryBank.nearest_unit_patches`): the normal memory then guides the student
    *and* scores the image directly.

    ``ablate`` switches parts off, for ablation studies: ``"normal_memory"`` (the fusion sees ``[F_l, 0]``: no
    memory guides the student), ``"abnormal_memory"`` (no abnormal bank: the contrast and triplet terms, which
    need it, are 0), ``"msff"`` (a 1x1 convolution per level maps the guided input to the student's input, with
    no attention and no top-down pathway).
    """

    memory_size: int = 30
    selection: str = "l2"
    blend: str = "draem"
    textures: str | None = None
    texture_count: int = 32
    anomaly_prob: float = 0.5
    anomaly_shapes: tuple[str, ...] = ("blobs",)
    sample_order: str = "random"
    kd_target: str = "clean"
    attention: str = "softmax"
    ssot: str = "sinkhorn"
    ssot_points: int = 256
    triplet: str = "embedding"
    triplet_margin: float = 1.0
    memory: str = "image"
    coreset_ratio: float = 1.0
    coreset_projection: int | None = 128
    memory_map_levels: tuple[int, ...] = ()
    ablate: tuple[str, ...] = ()
    separation_weight: float = 0.2
    contrast_weight: float = 0.1
    triplet_weight: float = 0.1

    PRESETS: ClassVar[dict] = {
        "clean": {"memory_map_levels": (3,)},
        "light": {"memory_map_levels": (3,), "ablate": ("msff",)},
        "official": {
            "selection": "legacy",
            "blend": "dmgrd_legacy",
            "ssot": "legacy",
            "triplet": "legacy",
            "image_score": "topk_mean",
            "kd_target": "input",
            "attention": "dot_product",
            "sample_order": "alternate",
        },
    }

    CHOICES: ClassVar[dict] = {
        **ModelConfig.CHOICES,
        "selection": SELECTIONS,
        "blend": BLEND_MODES,
        "kd_target": KD_TARGETS,
        "sample_order": SAMPLE_ORDERS,
        "attention": ATTENTION_MODES,
        "ssot": SSOT_MODES,
        "triplet": TRIPLET_MODES,
        "memory": MEMORY_KINDS,
    }

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_projection is not None and not (isinstance(self.coreset_projection, int)
                                                         and self.coreset_projection >= 1):
            raise ValueError(f"coreset_projection must be None or a positive int, got {self.coreset_projection!r}")
        if not self.triplet_margin >= 0:
            raise ValueError(f"triplet_margin must be >= 0, got {self.triplet_margin}")
        levels = tuple(sorted(set(self.memory_map_levels)))
        if not set(levels) <= {1, 2, 3}:
            raise ValueError(f"memory_map_levels must be a subset of (1, 2, 3), got {self.memory_map_levels!r}")
        self.memory_map_levels = levels
        ablate = (self.ablate,) if isinstance(self.ablate, str) else tuple(self.ablate)
        if not set(ablate) <= set(ABLATIONS):
            raise ValueError(f"ablate must name parts of {ABLATIONS}, got {self.ablate!r}")
        self.ablate = tuple(sorted(set(ablate)))
        shapes = (self.anomaly_shapes,) if isinstance(self.anomaly_shapes, str) else tuple(self.anomaly_shapes)
        if not shapes or not set(shapes) <= set(SHAPES) or len(set(shapes)) != len(shapes):
            raise ValueError(f"anomaly_shapes must be distinct names of {SHAPES}, got {self.anomaly_shapes!r}")
        if "lines" in shapes and self.blend != "draem":
            raise ValueError(f"anomaly_shapes with 'lines' need blend='draem', got blend={self.blend!r}")
        self.anomaly_shapes = shapes
        if "normal_memory" in self.ablate and (levels or self.triplet in ("memory", "legacy")):
            raise ValueError("ablate='normal_memory' leaves no normal memory for memory_map_levels "
                             f"{levels} (the clean preset's: pass memory_map_levels=() too) or "
                             f"triplet={self.triplet!r}")
        if self.memory == "patch" and self.triplet == "legacy":
            raise ValueError("triplet='legacy' gathers whole memory images, which memory='patch' does not select; "
                             "use memory='image' or another triplet mode")


class DMGRD(ReverseDistillation):
    """``dmgrd.DMGRD(backbone="wide_resnet50_2", weights="imagenet", preset="clean", image_size=256,
    memory_size=30, **options)``; options are the fields of :class:`DMGRDConfig`."""

    method = "dmgrd"
    config_class = DMGRDConfig
    config: DMGRDConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sizes = self.teacher.level_sizes(self.config.size)
        channels = self.teacher.channels
        self.normal_memory = self._memory_bank(channels, sizes)
        self.abnormal_memory = self._memory_bank(channels, sizes)
        ablated = "msff" in self.config.ablate
        self.fusion: nn.Module = GuidedProjection(channels) if ablated else MSFF(channels, self.config.attention)
        self.synthesizer: AnomalySynthesizer | None = None

    def _memory_bank(self, channels, sizes) -> MemoryBank:
        cfg = self.config
        if cfg.memory == "patch":
            return PatchMemoryBank(channels, sizes, cfg.memory_size, cfg.coreset_ratio, cfg.coreset_projection)
        return MemoryBank(channels, sizes, cfg.memory_size, cfg.selection)

    def _uses(self, part: str) -> bool:
        return part not in self.config.ablate

    def _normal_guidance(self, feats: list[torch.Tensor]) -> tuple[Selection | None, list[torch.Tensor]]:
        if self._uses("normal_memory"):
            return self.normal_memory.select(feats)
        return None, [guided_input(f, f) for f in feats]

    def recomputed_modules(self) -> list[nn.Module]:
        """Each MSFF block (most of DM-GRD's activations; one at a time is live in the backward pass), then the
        bottleneck and decoder stages."""
        fusion = list(self.fusion.blocks) if isinstance(self.fusion, MSFF) else [self.fusion]
        return [*fusion, *super().recomputed_modules()]

    def student_features(self, teacher_feats):
        _, guided = self._normal_guidance(teacher_feats)
        return self.decode(self.fusion(guided))

    def compared_pairs(self, teacher_feats, student_feats):
        queries, references = list(teacher_feats), list(student_feats)
        for level in self.config.memory_map_levels:
            query, nearest = self.normal_memory.nearest_unit_patches(teacher_feats[level - 1], level - 1)
            queries.append(query)
            references.append(nearest)
        return queries, references

    @torch.no_grad()
    def prepare(self, train_data, generator, batch_size=8, build_memory=True):
        """The anomaly synthesiser, then both memory banks (unless ``build_memory`` is False, e.g. on the
        ranks of a distributed run that receive them): teacher pyramids of ``memory_size`` training images,
        and of the same images with synthesised anomalies (patch memory: then each level's coreset)."""
        count = self.config.memory_size
        if len(train_data) < count:
            raise ValueError(f"DM-GRD needs at least memory_size={count} training images, got {len(train_data)}")
        self.synthesizer = AnomalySynthesizer(self._textures(generator), blend=self.config.blend,
                                              shapes=self.config.anomaly_shapes)
        if not build_memory:
            return
        indices = torch.randperm(len(train_data), generator=generator)[:count]
        images = torch.stack([train_data[int(i)]["image"] for i in indices]).to(self.device)
        self.check_images(images)
        augmented, _ = self.synthesizer.synth(images, generator)
        options = {"generator": generator} if self.config.memory == "patch" else {}
        banks = [(bank, source) for bank, source, part in ((self.normal_memory, images, "normal_memory"),
                                                           (self.abnormal_memory, augmented, "abnormal_memory"))
                 if self._uses(part)]
        for bank, source in banks:
            chunks = [self.teacher(chunk) for chunk in source.split(batch_size)]
            bank.fill([torch.cat(level) for level in zip(*chunks, strict=True)], indices, **options)

    def _textures(self, generator: torch.Generator) -> torch.Tensor:
        """``texture_count`` textures: a random subset of the ``textures`` folder, or procedural ones."""
        cfg = self.config
        if cfg.textures is None:
            return procedural_textures(cfg.texture_count, cfg.size, generator)
        return load_textures(cfg.textures, cfg.size, limit=cfg.texture_count, generator=generator)

    def _pick_augmented(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.config.sample_order == "alternate":
            return torch.arange(batch) % 2 == 1
        return torch.rand(batch, generator=generator) < self.config.anomaly_prob

    def training_losses(self, images, generator):
        if self.synthesizer is None:
            raise RuntimeError("call prepare() (done by fit()) before training")
        cfg = self.config
        batch = images.shape[0]
        augmented, _ = self.synthesizer.synth(images, generator)
        chosen = self._pick_augmented(batch, generator).to(images.device)[:, None, None, None]
        inputs = torch.where(chosen, augmented, images)
        # One teacher pass over the inputs and, for kd_target="clean", the clean originals of the augmented ones.
        restore = chosen.flatten() if cfg.kd_target == "clean" else chosen.new_zeros(batch)
        feats, clean = split_batch(self.teacher(torch.cat([inputs, images[restore]])), batch)
        target = [f.index_put((restore,), c) for f, c in zip(feats, clean, strict=True)] if restore.any() else feats
        index_n, guided_n = self._normal_guidance(feats)
        fused_n = self.fusion(guided_n)
        student = self.decode(fused_n)
        kd = kd_loss(target, student, cfg.kd_reduction)
        ssot = ssot_loss(fused_n, cfg.ssot, generator, cfg.ssot_points)
        if self._uses("abnormal_memory"):
            index_a, guided_a = self.abnormal_memory.select(feats)
            fused_a = self.fusion(guided_a)
            contrast = contrast_loss(fused_a, fused_n)
            triplet = self._triplet(fused_n, fused_a, index_n, index_a, generator, student)
        else:
            contrast = triplet = torch.zeros((), device=images.device)
        loss = kd + cfg.separation_weight * (ssot + cfg.contrast_weight * contrast) + cfg.triplet_weight * triplet
        return {"loss": loss, "kd": kd, "contrast": contrast, "ssot": ssot, "triplet": triplet}

    def _triplet(self, fused_n, fused_a, index_n, index_a, generator, student=None) -> torch.Tensor:
        mode, margin = self.config.triplet, self.config.triplet_margin
        if mode == "off":
            return torch.zeros((), device=fused_n[0].device)
        if mode == "legacy":
            anchor = [m[index_n] for m in self.normal_memory.items]
            other = [m[index_a] for m in self.abnormal_memory.items]
            return triplet_loss(anchor, other, other, margin)
        if mode == "memory":
            return memory_margin_loss(student, self.normal_memory.pooled(), self.abnormal_memory.pooled(), margin)
        batch = fused_n[0].shape[0]
        if batch < 2:
            return torch.zeros((), device=fused_n[0].device)
        shift = int(torch.randint(1, batch, (1,), generator=generator))
        return triplet_loss(fused_n, [z.roll(shift, dims=0) for z in fused_n], fused_a, margin)
