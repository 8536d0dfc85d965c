"""MemKD (Gu et al., ICCV 2023, "Remembering Normality: Memory-guided Knowledge Distillation").

A reconstruction from the paper's abstract, *unverified against the paper*: no public code is known and the
paper body was not available, so this is the reference design of SPEC §6 with every choice configurable.
Reverse distillation (as RD4AD) in which a normality-recall memory (:class:`~dmgrd.models.nr_memory.NRMemory`)
follows decoder stages 3, 2 and 1, so recalled normal features feed the next, finer stage. Normality
embedding learning: K normal training images (the exemplar set, greedy k-center on the teacher's pooled
coarsest features) are kept as teacher pyramids E_l; the memories start from prototypes of E_l and are
trained with

    L_NE = Σ_l [ mean_p min_j (1 - cos(E_l[p], M_l[j])) + mean_p (1 - cos(NR_l(E_l)[p], E_l[p])) ]

(the memory covers the exemplars; recall reproduces them) besides the KD loss: L = L_KD + λ_NE · L_NE.
Inference is RD4AD's.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmgrd.layout import pixel_rows
from dmgrd.models.config import ModelConfig
from dmgrd.models.memory import MemoryBank
from dmgrd.models.nr_memory import INIT_METHODS, NRMemory
from dmgrd.models.reverse_distillation import ReverseDistillation
from dmgrd.numerics import level_sum
from dmgrd.ops.coreset_update import greedy_coreset, nearest_to_mean

MEMORY_INITS = (*INIT_METHODS, "random")
EXEMPLAR_SELECTIONS = ("kcenter", "random")
LEVELS = (1, 2, 3)


@dataclass
class MemKDConfig(ModelConfig):
    """MemKD settings (SPEC §6; every one a hypothesis, unverified against the paper).

    ``memory_levels``: decoder stages followed by an NR memory (1 = finest). ``memory_items`` (N),
    ``temperature`` (τ) and ``shrink`` (MemAE hard-shrink threshold on the attention, None = off; MemAE's
    value is 1 / N): the memory's addressing. ``memory_init``: the items' start, spherical k-means
    (``"kmeans"``) or greedy k-center (``"kcenter"``) of the exemplars' teacher features, or the random
    initialisation (``"random"``). ``exemplars`` (K >= 3) training images, chosen by greedy k-center on the
    teacher's global-average-pooled coarsest level (``"kcenter"``) or at random (``"random"``).
    ``ne_weight``: λ_NE of the normality-embedding loss. The SPEC's ablation "RD + NR memory" (no normality
    embedding learning) is ``ne_weight=0, memory_init="random"``.

    There is no official code, so ``"official"`` is exactly the SPEC §6 reference design, and ``"clean"``
    (default) is the same design: the two presets are identical.
    """

    memory_levels: tuple[int, ...] = LEVELS
    memory_items: int = 50
    temperature: float = 0.1
    shrink: float | None = None
    memory_init: str = "kmeans"
    exemplars: int = 10
    exemplar_selection: str = "kcenter"
    ne_weight: float = 0.1

    PRESETS: ClassVar[dict] = {"clean": {}, "official": {}}
    CHOICES: ClassVar[dict] = {
        **ModelConfig.CHOICES,
        "memory_init": MEMORY_INITS,
        "exemplar_selection": EXEMPLAR_SELECTIONS,
    }

    def __post_init__(self):
        super().__post_init__()
        levels = tuple(sorted(set(self.memory_levels)))
        if not levels or not set(levels) <= set(LEVELS):
            raise ValueError(f"memory_levels must be a non-empty subset of {LEVELS}, got {self.memory_levels!r}")
        self.memory_levels = levels
        if self.exemplars < 3:
            raise ValueError(f"exemplars must be at least 3, got {self.exemplars}")


def normality_embedding_loss(exemplars: torch.Tensor, memory: NRMemory) -> torch.Tensor:
    """One level of L_NE for exemplar teacher features [K, C, H, W]: the mean over positions of the cosine
    distance to the nearest memory item, plus the mean cosine distance between the memory's output and its
    input (computed in float32)."""
    pixels = F.normalize(pixel_rows(exemplars).float(), dim=1)
    items = F.normalize(memory.memory.float(), dim=1)
    coverage = (1 - pixels @ items.T).amin(1).mean()
    recall = (1 - F.cosine_similarity(memory(exemplars).float(), exemplars.float(), dim=1)).mean()
    return coverage + recall


class MemKD(ReverseDistillation):
    """``dmgrd.MemKD(backbone="wide_resnet50_2", weights="imagenet", preset="clean", image_size=256, **options)``;
    options are the fields of :class:`MemKDConfig`. A reconstruction from the abstract, unverified against
    the paper (see the module docstring)."""

    method = "memkd"
    config_class = MemKDConfig
    config: MemKDConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        channels = self.teacher.channels
        self.memories = nn.ModuleList(
            NRMemory(c, config.memory_items, config.temperature, config.shrink) if level in config.memory_levels
            else nn.Identity()
            for level, c in zip(LEVELS, channels, strict=True)
        )
        self.exemplar_memory = MemoryBank(channels, self.teacher.level_sizes(config.size), config.exemplars)

    def decode(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student pyramid, with each chosen decoder stage's output passed through its NR memory."""
        return self.decoder(self.bottleneck(feats), self.memories)

    @property
    def exemplar_features(self) -> list[torch.Tensor]:
        """Teacher pyramids E_l [K, C_l, H_l, W_l] of the exemplar set (zeros before :meth:`prepare`)."""
        return self.exemplar_memory.items

    @torch.no_grad()
    def prepare(self, train_data, generator, batch_size=8, build_memory=True):
        """Choose the exemplar set, cache its teacher pyramids and initialise the memories from them (skipped
        with ``build_memory=False``: a distributed run broadcasts rank 0's)."""
        count = self.config.exemplars
        if len(train_data) < count:
            raise ValueError(f"MemKD needs at least exemplars={count} training images, got {len(train_data)}")
        if not build_memory:
            return
        indices = self.select_exemplars(train_data, generator, batch_size)
        feats = self._teacher_pyramids(train_data, indices, batch_size)
        self.exemplar_memory.fill(feats, indices)
        if self.config.memory_init != "random":
            for level in self.config.memory_levels:
                self.memories[level - 1].init_from(feats[level - 1], self.config.memory_init)

    @torch.no_grad()
    def select_exemplars(self, train_data, generator: torch.Generator, batch_size: int = 8) -> torch.Tensor:
        """Dataset indices [K] of the exemplar set, in selection order."""
        count = self.config.exemplars
        if self.config.exemplar_selection == "random":
            return torch.randperm(len(train_data), generator=generator)[:count]
        batches = self._teacher_batches(train_data, torch.arange(len(train_data)), batch_size)
        pooled = torch.cat([feats[-1].float().mean((2, 3)) for feats in batches])
        return greedy_coreset(pooled, count, start=nearest_to_mean(pooled)).cpu()

    def _teacher_pyramids(self, train_data, indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        return [torch.cat(level) for level in zip(*self._teacher_batches(train_data, indices, batch_size), strict=True)]

    def _teacher_batches(self, train_data, indices: torch.Tensor, batch_size: int) -> Iterator[list[torch.Tensor]]:
        """Teacher pyramids of the training images ``indices``, one batch at a time."""
        for chunk in indices.split(batch_size):
            images = torch.stack([train_data[int(i)]["image"] for i in chunk]).to(self.device)
            self.check_images(images)
            yield self.teacher(images)

    def normality_embedding_loss(self) -> torch.Tensor:
        """L_NE summed over the levels with a memory."""
        return level_sum(normality_embedding_loss(self.exemplar_features[level - 1], self.memories[level - 1])
                         for level in self.config.memory_levels)

    def training_losses(self, images, generator):
        if not self.exemplar_memory.filled:
            raise RuntimeError("call prepare() (done by fit()) before training")
        kd = super().training_losses(images, generator)["kd"]
        ne = self.normality_embedding_loss()
        return {"loss": kd + self.config.ne_weight * ne, "kd": kd, "ne": ne}
