"""Tiles of ``[B, C, H, W]`` tensors (any strides) shared by the channel-loop Triton kernels (channel_pool,
fuse_pyramid): one program per block of ``BLOCK_P`` pixels of one image, looping over ``BLOCK_C`` channels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl  # noqa: F401  (the Triton interpreter needs it in a jit function's module)

BLOCK_C = 16  # channels per tile
BLOCK_P = 64  # pixels per program of the channel loops


@triton.jit
def tile(chan, pix, C, P, W, sc, sh, sw):
    """Element offsets (without the image's) and mask of the tile ``chan`` x ``pix``."""
    offsets = chan[:, None] * sc + ((pix // W) * sh + (pix % W) * sw)[None, :]
    return offsets, (chan < C)[:, None] & (pix < P)[None, :]


def pixel_grid(x: torch.Tensor, block: int) -> tuple[int, int]:
    """Grid of one program per ``block`` pixels of each image of ``x`` [B, C, H, W]."""
    return triton.cdiv(x.shape[2] * x.shape[3], block), x.shape[0]
