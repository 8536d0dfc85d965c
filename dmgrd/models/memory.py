"""DM-GRD memory bank (SPEC §4.3): teacher pyramids of L training images kept as buffers, the nearest item
for each query, and the memory-guided input ``[F_l, (M_l[j*] - F_l)^2]`` of the fusion module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SELECTIONS = ("l2", "attention", "legacy")


class MemoryBank(nn.Module):
    """L full teacher pyramids (buffers ``items_0..2`` of shape [L, C_l, H_l, W_l]) and their dataset indices.

    ``selection`` picks the item each query is compared with:
    ``"l2"`` the nearest item by mean squared distance over all levels (the MemSeg intent);
    ``"attention"`` the item with the largest mean softmax-cosine attention of the query's pixels;
    ``"legacy"`` the official code's top-k-of-channels statistic, whose argmin is always the last index of a
    level block ({L/3-1, 2L/3-1, L-1}), i.e. one fixed item for every query.
    """

    def __init__(self, channels: tuple[int, ...], sizes: tuple[tuple[int, int], ...], memory_size: int = 30,
                 selection: str = "l2"):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if memory_size < 3:
            raise ValueError(f"memory_size must be at least 3, got {memory_size}")
        self.selection = selection
        self.num_levels = len(channels)
        for level, (c, (h, w)) in enumerate(zip(channels, sizes)):
            self.register_buffer(f"items_{level}", torch.zeros(memory_size, c, h, w))
        self.register_buffer("indices", torch.full((memory_size,), -1, dtype=torch.long))

    @property
    def items(self) -> list[torch.Tensor]:
        return [getattr(self, f"items_{level}") for level in range(self.num_levels)]

    @property
    def filled(self) -> bool:
        return bool((self.indices >= 0).all())

    @torch.no_grad()
    def fill(self, feats: list[torch.Tensor], indices: torch.Tensor) -> None:
        """Store the teacher pyramids ``feats`` (each [L, C_l, H_l, W_l]) of dataset items ``indices``."""
        for item, f in zip(self.items, feats):
            if f.shape != item.shape:
                raise ValueError(f"memory item shape {tuple(f.shape)} != bank shape {tuple(item.shape)}")
            item.copy_(f)
        self.indices.copy_(indices)

    @torch.no_grad()
    def distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Selection score D [B, L] (or [B, 3 * (L // 3)] for ``"legacy"``); the chosen item is its argmin."""
        if self.selection == "l2":
            return sum(_mean_squared_distance(f, m) for f, m in zip(feats, self.items))
        if self.selection == "attention":
            return -sum(_item_attention(f, m).mean(2) for f, m in zip(feats, self.items))
        k = self.items[0].shape[0] // 3
        return torch.cat([_legacy_statistic(f, m, k) for f, m in zip(feats, self.items)], dim=1)

    def select(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Index j* [B] of the chosen item and the memory-guided inputs ``[F_l, (M_l[j*] - F_l)^2]`` per level."""
        if not self.filled:
            raise RuntimeError("the memory bank is empty: fit the model (or load a fitted checkpoint) first")
        chosen = self.distances(feats).argmin(1)
        guided = [torch.cat([f, (m[chosen].to(f.dtype) - f).square()], dim=1) for f, m in zip(feats, self.items)]
        return chosen, guided


def _mean_squared_distance(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """mean over C, H, W of (f[b] - m[j])^2 for every pair, via one B x D @ D x L product."""
    f, m = f.flatten(1).float(), m.flatten(1).float()
    d = f.square().sum(1, keepdim=True) + m.square().sum(1) - 2 * f @ m.T
    return d.clamp_min(0) / f.shape[1]


def _item_attention(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """softmax over items j of cos(GAP(m_j), f[b, :, p]) -> [B, L, H*W]."""
    pixels = F.normalize(f.flatten(2).float(), dim=1)  # B x C x P
    items = F.normalize(m.float().mean((2, 3)), dim=1)  # L x C
    return torch.softmax(torch.einsum("lc,bcp->blp", items, pixels), dim=1)


def _legacy_statistic(f: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    """The official ``_calc_diff``: attention read-out of GAP memory, top-k over *channels*, mean over pixels."""
    attention = _item_attention(f, m)  # B x L x P
    readout = torch.einsum("blp,lc->bcp", attention, m.float().mean((2, 3)))
    return readout.topk(k, dim=1).values.mean(2)
