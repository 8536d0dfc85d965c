"""Triton channel_pool, forward and backward: semantics of the torch reference in :mod:`dmgrd.ops.channel_pool`;
one program per block of pixels of one image over channel tiles (:mod:`dmgrd.kernels.pixel_tiles`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dmgrd.kernels.pixel_tiles import BLOCK_C, BLOCK_P, pixel_grid, tile

from dmgrd.layout import dense_like


@triton.jit
def _channel_pool_kernel(x_ptr, pooled_ptr, ties_ptr, C, P, W, sb, sc, sh, sw,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    count = tl.zeros([BLOCK_P], tl.float32)
    total = tl.zeros([BLOCK_P], tl.float32)
    has_nan = tl.zeros([BLOCK_P], tl.int1)
    for c0 in range(0, C, BLOCK_C):
        offsets, mask = tile(c0 + tl.arange(0, BLOCK_C), pix, C, P, W, sc, sh, sw)
        x = tl.load(x_ptr + b * sb + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(x, 0)
        tile_count = tl.sum((mask & (x == tile_max[None, :])).to(tl.float32), 0)
        count = tl.where(tile_max > best, tile_count, tl.where(tile_max == best, count + tile_count, count))
        best = tl.maximum(best, tile_max)
        total += tl.sum(tl.where(mask, x, 0.0), 0)
        has_nan = has_nan | (tl.max((x != x).to(tl.int32), 0) > 0)
    best = tl.where(has_nan, float("nan"), best)
    in_image = pix < P
    out = pooled_ptr + b * 2 * P + pix
    tl.store(out, best.to(pooled_ptr.dtype.element_ty), mask=in_image)
    tl.store(out + P, (total / C).to(pooled_ptr.dtype.element_ty), mask=in_image)
    tl.store(ties_ptr + b * P + pix, count.to(tl.int32), mask=in_image)


@triton.jit
def _channel_pool_backward_kernel(grad_ptr, x_ptr, pooled_ptr, ties_ptr, gx_ptr, C, P, W,
                                  x_sb, x_sc, x_sh, x_sw, gx_sb, gx_sc, gx_sh, gx_sw,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = pix < P
    pixel = b * 2 * P + pix  # grad and pooled are contiguous [B, 2, H, W]
    best = tl.load(pooled_ptr + pixel, mask=in_image).to(tl.float32)
    ties = tl.load(ties_ptr + b * P + pix, mask=in_image, other=1).to(tl.float32)
    share = tl.load(grad_ptr + pixel, mask=in_image).to(tl.float32) / ties
    mean_share = tl.load(grad_ptr + pixel + P, mask=in_image).to(tl.float32) / C
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        x_offsets, mask = tile(chan, pix, C, P, W, x_sc, x_sh, x_sw)
        gx_offsets, _ = tile(chan, pix, C, P, W, gx_sc, gx_sh, gx_sw)
        x = tl.load(x_ptr + b * x_sb + x_offsets, mask=mask).to(tl.float32)
        gx = (x == best[None, :]).to(tl.float32) * share[None, :] + mean_share[None, :]
        tl.store(gx_ptr + b * gx_sb + gx_offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def channel_pool_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, 2, H, W] channel max and mean, int32 [B, H, W] number of channels at the max)``."""
    batch, channels, height, width = x.shape
    pooled = x.new_empty((batch, 2, height, width))
    ties = x.new_empty((batch, height, width), dtype=torch.int32)
    _channel_pool_kernel[pixel_grid(x, BLOCK_P)](x, pooled, ties, channels, height * width, width, *x.stride(),
                                                   BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    return pooled, ties


def channel_pool_backward_triton(grad: torch.Tensor, x: torch.Tensor, pooled: torch.Tensor,
                                 ties: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`channel_pool_triton` with respect to ``x``."""
    grad_x = dense_like(x)
    _channel_pool_backward_kernel[pixel_grid(x, BLOCK_P)](
        grad.contiguous(), x, pooled, ties, grad_x, x.shape[1], x.shape[2] * x.shape[3], x.shape[3],
        *x.stride(), *grad_x.stride(), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    return grad_x
