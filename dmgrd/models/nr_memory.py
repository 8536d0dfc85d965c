"""MemKD's normality-recall memory (NR Memory) and the prototype selection used to initialise it.

A reconstruction of Gu et al., "Remembering Normality: Memory-guided Knowledge Distillation" (ICCV 2023)
from the paper's abstract only, *unverified against the paper*: the design is the reference design of
SPEC §6, whose every choice (addressing, temperature, shrinkage, fusion, initialisation) is a hypothesis.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmgrd import ops
from dmgrd.layout import pixel_rows
from dmgrd.ops.coreset_update import greedy_coreset, nearest_to_mean

INIT_METHODS = ("kmeans", "kcenter")


def spherical_kmeans(points: torch.Tensor, k: int, iterations: int = 10) -> torch.Tensor:
    """Centres [k, D] of ``points`` [P, D] clustered by cosine similarity (Lloyd iterations from a greedy
    k-center seeding of the unit vectors). Each centre is the plain mean of its points, so it keeps the
    features' scale; a centre that loses all its points stays where it was."""
    x = _accumulated(points)
    unit = F.normalize(x, dim=1)
    centres = x[greedy_coreset(unit, k, start=nearest_to_mean(unit))]
    for _ in range(iterations):
        assign = F.one_hot((unit @ F.normalize(centres, dim=1).T).argmax(1), k).to(x.dtype)  # P x k
        counts = assign.sum(0).unsqueeze(1)
        centres = torch.where(counts > 0, assign.T @ x / counts.clamp_min(1), centres)
    return centres


def _accumulated(points: torch.Tensor) -> torch.Tensor:
    return points.double() if points.dtype == torch.float64 else points.float()


def hard_shrink(weights: torch.Tensor, threshold: float, eps: float = 1e-12) -> torch.Tensor:
    """MemAE's hard shrinkage of attention rows: ``relu(w - λ) * w / (|w - λ| + eps)``, then L1-renormalised."""
    shrunk = F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)
    return F.normalize(shrunk, p=1, dim=-1)


class NRMemory(nn.Module):
    """Normality-recall memory on a [B, C, H, W] feature map (MemKD, SPEC §6; unverified against the paper).

    Holds ``items`` trainable prototypes M [N, C]. Each position's feature q reads out
    r = softmax(cos(q, M) / temperature) @ M, optionally with MemAE hard shrinkage of the weights at
    ``shrink`` (MemAE uses 1 / N), and the output is ``conv1x1([q; r]) + q`` (2C -> C, with bias).
    All positions of the batch are one [B*H*W, N] attention. Without ``shrink`` the read-out is
    :func:`dmgrd.ops.memory_readout` (fused where a fast backend exists); with it the weights themselves are
    needed, so that path is computed in torch.
    """

    def __init__(self, channels: int, items: int = 50, temperature: float = 0.1, shrink: float | None = None):
        super().__init__()
        if items < 1:
            raise ValueError(f"items must be >= 1, got {items}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if shrink is not None and not 0 <= shrink < 1:
            raise ValueError(f"shrink must be None or in [0, 1), got {shrink}")
        self.temperature = float(temperature)
        self.shrink = shrink
        self.memory = nn.Parameter(torch.randn(items, channels) / math.sqrt(channels))
        self.fuse = nn.Conv2d(2 * channels, channels, kernel_size=1)

    def weights(self, query: torch.Tensor) -> torch.Tensor:
        """Attention [P, N] of queries [P, C] over the items (float32), shrunk when ``shrink`` is set."""
        scores = F.normalize(query.float(), dim=1) @ F.normalize(self.memory.float(), dim=1).T
        attention = torch.softmax(scores / self.temperature, dim=1)
        return attention if self.shrink is None else hard_shrink(attention, self.shrink)

    def recall(self, query: torch.Tensor) -> torch.Tensor:
        """Recalled normal features r [P, C] for queries [P, C], in the query's dtype."""
        if self.shrink is None:
            return ops.memory_readout(query, self.memory.to(query.dtype), self.temperature)
        return (self.weights(query) @ self.memory.float()).to(query.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        recalled = self.recall(pixel_rows(x)).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return self.fuse(torch.cat([x, recalled.to(x.dtype)], dim=1)) + x

    @torch.no_grad()
    def init_from(self, features: torch.Tensor, method: str = "kmeans", iterations: int = 10) -> None:
        """Set the items from ``features`` ([P, C] rows or [K, C, H, W] maps): spherical k-means centres
        (``"kmeans"``, ``iterations`` Lloyd steps) or a greedy k-center subset of the unit vectors, i.e. under
        cosine distance (``"kcenter"``)."""
        if method not in INIT_METHODS:
            raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
        rows = pixel_rows(features) if features.dim() == 4 else features
        items, channels = self.memory.shape
        if rows.dim() != 2 or rows.shape[1] != channels:
            raise ValueError(f"features must have {channels} channels, got shape {tuple(features.shape)}")
        if rows.shape[0] < items:
            raise ValueError(f"{items} memory items need at least as many feature vectors, got {rows.shape[0]}")
        if method == "kmeans":
            centres = spherical_kmeans(rows, items, iterations)
        else:
            unit = F.normalize(rows.float(), dim=1)
            centres = rows[greedy_coreset(unit, items, start=nearest_to_mean(unit))]
        self.memory.copy_(centres)
