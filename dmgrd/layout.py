"""Sizes and memory layouts shared by every layer: image sizes as ``(H, W)``, feature maps as pixel rows, and
the layout the fast kernels write."""

from collections.abc import Sequence

import torch

from dmgrd.sizes import Size, parse_size, size_pair

__all__ = ["Size", "cosine_rows", "dense_format", "dense_like", "parse_size", "pixel_rows", "size_pair"]

def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B * H * W, C]``: one row per pixel of the ``[B, C, H, W]`` map ``x`` (ordered by image, then pixel)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the fast paths compute ``x`` in (and give its outputs and gradients): channels_last when ``x``
    is channels_last only, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor like ``x`` in :func:`dense_format`."""
    return torch.empty_like(x, memory_format=dense_format(x))


def cosine_rows(feats: Sequence[torch.Tensor], reduction: str) -> int:
    """Rows of the cosine KD loss over all ``[B, C, H, W]`` levels: one per image (``"flatten"``) or one per
    pixel (``"pixel"``)."""
    if reduction == "flatten":
        return len(feats) * feats[0].shape[0]
    return sum(f.shape[0] * f.shape[2] * f.shape[3] for f in feats)
