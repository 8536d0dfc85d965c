"""Tiles of ``[B, C, H, W]`` tensors (any strides) shared by the channel-loop Triton kernels (channel_pool,
fuse_pyramid): one program per block of ``BLOCK_P`` pixels of one image, looping over ``BLOCK_C`` channels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C = 16  # channels per tile
BLOCK_P = 64  # pixels per program of the channel loops


@triton.jit
def tile(chan, pix, C, P, W, sc, sh, sw):
    """Element offsets (without the image's) and mask of the tile ``chan`` x ``pix``; int64, so an image of more
    than 2^31 elements is addressed correctly."""
    offsets = chan.to(tl.int64)[:, None] * sc + ((pix // W).to(tl.int64) * sh + (pix % W) * sw)[None, :]
    return offsets, (chan < C)[:, None] & (pix < P)[None, :]


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes (the interpreter has none)


def batch_axis(batch: int, op: str) -> int:
    """``batch`` as a grid's y size: ValueError past CUDA's 65535, which would fail the launch on a GPU only."""
    if batch > MAX_GRID_YZ:
        raise ValueError(f"{op} (Triton) launches one grid row per image: at most {MAX_GRID_YZ} images per call, "
                         f"got {batch}; split the batch")
    return batch


def pixel_grid(x: torch.Tensor, block: int) -> tuple[int, int]:
    """Grid of one program per ``block`` pixels of each image of ``x`` [B, C, H, W]."""
    return triton.cdiv(x.shape[2] * x.shape[3], block), batch_axis(x.shape[0], "pixel tiles")
