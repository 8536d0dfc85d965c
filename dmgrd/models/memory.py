"""DM-GRD memory bank (SPEC §4.3): teacher pyramids of L training images kept as buffers, the nearest item
(or, for patch memory, the nearest patch) for each query, and the memory-guided input ``[F_l, (M_l - F_l)^2]``
of the fusion module."""

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmgrd import ops
from dmgrd.layout import pixel_rows
from dmgrd.models.state import register_data_buffer
from dmgrd.numerics import level_sum
from dmgrd.ops.memory_nearest import pairwise_distance_reference

SELECTIONS = ("l2", "attention", "legacy")
# What a bank's select() chose: item indices [B] (image memory) or, per level, patch rows [B, H_l, W_l].
Selection = torch.Tensor | list[torch.Tensor]
MEMORY_KINDS = ("image", "patch")


class DerivedCache:
    """Tensors derived from buffers (flattened banks, pooled items), rebuilt when a source buffer changes.

    A source changes in place (``fill``, ``load_state_dict``: its version counter moves) or is replaced
    (``.to()``: the owner calls :meth:`clear` from ``_apply``).
    """

    def __init__(self):
        self._entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    def get(self, name: str, sources: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in sources)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, build())
            self._entries[name] = entry
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()


class MemoryBank(nn.Module):
    """L full teacher pyramids (buffers ``items_0..2`` of shape [L, C_l, H_l, W_l]) and their dataset indices.

    ``selection`` picks the item each query is compared with:
    ``"l2"`` the nearest item by mean squared distance over all levels (the MemSeg intent), found by
    :func:`dmgrd.ops.memory_nearest` on the levels flattened and scaled by ``1/sqrt(C_l H_l W_l)``;
    ``"attention"`` the item with the largest mean softmax-cosine attention of the query's pixels;
    ``"legacy"`` the official code's top-k-of-channels statistic, whose argmin is always the last index of a
    level block ({L/3-1, 2L/3-1, L-1}), i.e. one fixed item for every query.
    """

    indices: torch.Tensor


    def __init__(self, channels: tuple[int, ...], sizes: tuple[tuple[int, int], ...], memory_size: int = 30,
                 selection: str = "l2"):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if memory_size < 3:
            raise ValueError(f"memory_size must be at least 3, got {memory_size}")
        self.selection = selection
        self.num_levels = len(channels)
        for level, (c, (h, w)) in enumerate(zip(channels, sizes, strict=True)):
            register_data_buffer(self, f"items_{level}", torch.zeros(memory_size, c, h, w))
        register_data_buffer(self, "indices", torch.full((memory_size,), -1, dtype=torch.long))
        self._cache = DerivedCache()

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # the buffers are about to be replaced (.to(), .half(), ...)
        return super()._apply(fn, recurse)

    @property
    def items(self) -> list[torch.Tensor]:
        return [getattr(self, f"items_{level}") for level in range(self.num_levels)]

    @property
    def filled(self) -> bool:
        return bool((self.indices >= 0).all())

    @torch.no_grad()
    def fill(self, feats: list[torch.Tensor], indices: torch.Tensor) -> None:
        """Store the teacher pyramids ``feats`` (each [L, C_l, H_l, W_l]) of dataset items ``indices``."""
        for item, f in zip(self.items, feats, strict=True):
            if f.shape != item.shape:
                raise ValueError(f"memory item shape {tuple(f.shape)} != bank shape {tuple(item.shape)}")
            item.copy_(f)
        self.indices.copy_(indices)

    def flat_items(self) -> torch.Tensor:
        """[L, sum_l C_l H_l W_l]: the items as :func:`flatten_scaled` rows (cached)."""
        return self._cache.get("flat", self.items, lambda: flatten_scaled(self.items, self.items[0].dtype))

    def pooled(self) -> list[torch.Tensor]:
        """Per level [L, C_l]: the L2-normalised global average pool of every item (cached)."""
        return [self._cache.get(f"pooled_{level}", [m], functools.partial(_unit_rows, means, m.dtype))
                for level, (means, m) in enumerate(zip(self.item_means(), self.items, strict=True))]

    def item_means(self) -> list[torch.Tensor]:
        """Per level [L, C_l]: the float32 global average pool of every item (cached: the ``"attention"`` and
        ``"legacy"`` selections read it on every forward)."""
        return [self._cache.get(f"means_{level}", [m], functools.partial(_float_means, m))
                for level, m in enumerate(self.items)]

    @torch.no_grad()
    def distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Selection score D [B, L] (or [B, 3 * (L // 3)] for ``"legacy"``); the chosen item is its argmin."""
        if self.selection == "l2":
            bank = self.flat_items()
            dist, index = ops.memory_nearest(flatten_scaled(feats, bank.dtype), bank, bank.shape[0], "l2")
            return torch.empty_like(dist).scatter_(1, index, dist)
        if self.selection == "attention":
            return -level_sum(_item_attention(f, m).mean(2) for f, m in zip(feats, self.item_means(), strict=True))
        k = self.items[0].shape[0] // 3
        return torch.cat([_legacy_statistic(f, m, k) for f, m in zip(feats, self.item_means(), strict=True)], dim=1)

    @torch.no_grad()
    def nearest(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Index j* [B] of the item each query is compared with."""
        if self.selection == "l2":
            bank = self.flat_items()
            return nearest_rows(flatten_scaled(feats, bank.dtype), bank)
        return self.distances(feats).argmin(1)

    def unit_patches(self, level: int, window: int = 3) -> torch.Tensor:
        """[L * H_l * W_l, C_l]: every item's pixels of ``level``, averaged over ``window`` x ``window`` and scaled
        to unit length (cached)."""
        items = self.items[level]
        return self._cache.get(f"unit_patches_{level}_{window}", [items],
                               lambda: pixel_rows(F.normalize(local_average(items, window), dim=1)))

    def nearest_unit_patches(self, feats: torch.Tensor, level: int, window: int = 3) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """The queries ``feats`` [B, C_l, H, W] averaged as :meth:`unit_patches` and, for each pixel, the nearest
        (smallest angle) of the unit patches, both ``[B, C_l, H, W]``."""
        check_filled(self)
        query = local_average(feats, window)
        bank = self.unit_patches(level, window).to(feats.dtype)
        rows = nearest_rows(pixel_rows(F.normalize(query, dim=1)), bank)
        batch, _, height, width = feats.shape
        return query, bank[rows].view(batch, height, width, bank.shape[1]).permute(0, 3, 1, 2)

    def select(self, feats: list[torch.Tensor]) -> tuple[Selection, list[torch.Tensor]]:
        """Index j* [B] of the chosen item and the memory-guided inputs ``[F_l, (M_l[j*] - F_l)^2]`` per level."""
        check_filled(self)
        chosen = self.nearest(feats)
        return chosen, [guided_input(f, m[chosen]) for f, m in zip(feats, self.items, strict=True)]


class PatchMemoryBank(MemoryBank):
    """Patch-level memory (PatchCore-style): every pixel of the L stored pyramids is a memory patch.

    For level l the bank holds the ``L * H_l * W_l`` rows of ``C_l`` features of all items (rows ordered by
    item, then pixel); ``coreset_ratio < 1`` keeps ``max(1, int(ratio * rows))`` of them, chosen by greedy
    k-center (:func:`dmgrd.ops.greedy_coreset`, in a ``coreset_projection``-dimensional random projection
    when the level has more channels) when the bank is filled, and stored as index buffers ``coreset_l``.
    Each query pixel is compared with its nearest patch (squared L2, :func:`dmgrd.ops.memory_nearest`), so
    the guided input is ``[F_l, (P_l[nn(p)] - F_l)^2]`` pixel by pixel. Image-level ``selection`` does not apply.
    """

    def __init__(self, channels: tuple[int, ...], sizes: tuple[tuple[int, int], ...], memory_size: int = 30,
                 coreset_ratio: float = 1.0, coreset_projection: int | None = 128):
        super().__init__(channels, sizes, memory_size)
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = coreset_ratio
        self.coreset_projection = coreset_projection
        if coreset_ratio < 1:
            for level, (h, w) in enumerate(sizes):
                size = max(1, int(coreset_ratio * memory_size * h * w))
                register_data_buffer(self, f"coreset_{level}", torch.full((size,), -1, dtype=torch.long))

    @property
    def coresets(self) -> list[torch.Tensor]:
        """Per level the kept patch rows, or nothing without a coreset."""
        if self.coreset_ratio == 1:
            return []
        return [getattr(self, f"coreset_{level}") for level in range(self.num_levels)]

    @property
    def filled(self) -> bool:
        return super().filled and all(bool((c >= 0).all()) for c in self.coresets)

    @torch.no_grad()
    def fill(self, feats: list[torch.Tensor], indices: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Store the pyramids as :meth:`MemoryBank.fill`, then select each level's coreset; ``generator`` draws
        the random projections."""
        super().fill(feats, indices)
        for level, coreset in enumerate(self.coresets):
            patches = pixel_rows(self.items[level])
            projection = self.coreset_projection
            if projection is not None and projection >= patches.shape[1]:
                projection = None
            coreset.copy_(ops.greedy_coreset(patches, coreset.numel(), projection_dim=projection, generator=generator))

    def patch_bank(self, level: int) -> torch.Tensor:
        """[P_l, C_l]: the memory patches of ``level`` (the coreset rows when there is one; cached)."""
        items = self.items[level]
        if not self.coresets:
            return self._cache.get(f"patches_{level}", [items], lambda: pixel_rows(items))
        coreset = self.coresets[level]
        return self._cache.get(f"patches_{level}", [items, coreset],
                               lambda: pixel_rows(items).index_select(0, coreset))

    @torch.no_grad()
    def nearest_patches(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level [B, H_l, W_l]: the row of :meth:`patch_bank` nearest to each query pixel."""
        rows = []
        for level, f in enumerate(feats):
            bank = self.patch_bank(level)
            rows.append(nearest_rows(pixel_rows(f).to(bank.dtype), bank).view(f.shape[0], *f.shape[2:]))
        return rows

    def select(self, feats: list[torch.Tensor]) -> tuple[Selection, list[torch.Tensor]]:
        """Nearest patch rows per level ([B, H_l, W_l]) and the guided inputs ``[F_l, (P_l[nn] - F_l)^2]``."""
        check_filled(self)
        rows = self.nearest_patches(feats)
        guided = []
        for level, (f, index) in enumerate(zip(feats, rows, strict=True)):
            nearest = self.patch_bank(level)[index].permute(0, 3, 1, 2)  # B x C x H x W
            guided.append(guided_input(f, nearest))
        return rows, guided


def nearest_items(query: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distances and indices ``[N, k]`` of the ``k`` ``bank`` rows nearest to each ``query`` row,
    nearest first, by :func:`dmgrd.ops.memory_nearest`; during ONNX export, which has neither custom ops nor a
    stable sort, by the top-k of the reference distance matrix (the same definition; an exact tie may pick
    another of the tied rows)."""
    if torch.onnx.is_in_onnx_export():
        return pairwise_distance_reference(query, bank, "l2").topk(k, dim=1, largest=False)
    return ops.memory_nearest(query, bank, k, "l2")


def check_filled(bank: nn.Module) -> None:
    """Raises unless ``bank.filled``. Skipped inside ``torch.compile``: a compiled forward comes from
    ``optimize()``, whose eager pass has checked, and the data-dependent branch would split the graph."""
    if not torch.compiler.is_compiling() and not bank.filled:
        raise RuntimeError("the memory bank is empty: fit the model (or load a fitted checkpoint) first")


def nearest_rows(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[N]: the ``bank`` row nearest to each ``query`` row (squared L2, lowest index on ties)."""
    return nearest_items(query, bank)[1][:, 0]


def local_average(feats: torch.Tensor, window: int) -> torch.Tensor:
    """Each pixel's features averaged over the ``window`` x ``window`` neighbourhood inside the image (PatchCore's
    locally aware patch features); ``window`` odd."""
    return F.avg_pool2d(feats, window, stride=1, padding=window // 2, count_include_pad=False)


def guided_input(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The memory-guided input ``[f, (m - f)^2]`` (channels doubled), in ``f``'s dtype."""
    return torch.cat([f, (m.to(f.dtype) - f).square()], dim=1)


def flatten_scaled(feats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[B, sum_l C_l H_l W_l]: each level flattened and divided by ``sqrt(C_l H_l W_l)``, so the squared L2
    distance of two rows is ``sum_l mean_{c,h,w} (f_l - m_l)^2``."""
    return torch.cat([f.flatten(1).to(dtype) / math.sqrt(f.shape[1:].numel()) for f in feats], dim=1)


def _unit_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` scaled to unit length, in ``dtype``."""
    return F.normalize(rows, dim=1).to(dtype)


def _float_means(items: torch.Tensor) -> torch.Tensor:
    """[L, C]: the float32 global average pool of items [L, C, H, W]."""
    return items.float().mean((2, 3))


def _item_attention(f: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """softmax over items j of cos(GAP(m_j), f[b, :, p]) -> [B, L, H*W], from the items' float GAP ``means``."""
    pixels = F.normalize(f.flatten(2).float(), dim=1)  # B x C x P
    items = F.normalize(means, dim=1)  # L x C
    return torch.softmax(torch.einsum("lc,bcp->blp", items, pixels), dim=1)


def _legacy_statistic(f: torch.Tensor, means: torch.Tensor, k: int) -> torch.Tensor:
    """The official ``_calc_diff``: attention read-out of GAP memory (the items' float ``means``), top-k over
    *channels*, mean over pixels."""
    attention = _item_attention(f, means)  # B x L x P
    readout = torch.einsum("blp,lc->bcp", attention, means)
    return readout.topk(k, dim=1).values.mean(2)
