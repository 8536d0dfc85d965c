"""Triton image scores: the maximum of each anomaly map, or the exact mean of its ``k`` largest pixels.

Semantics are those of :func:`dmgrd.ops.image_score.image_score_reference`; a map with a NaN scores NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # pixels per loop step; each program scores one whole image


@triton.jit
def _load_pixels(base, pix, W, sh, sw, mask):
    """Pixels ``pix`` (flat row-major indices) of one ``[H, W]`` map as float32; 0 where masked."""
    return tl.load(base + (pix // W) * sh + (pix % W) * sw, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _order_key(x):
    """int32 key of float32 ``x`` whose integer order is the float order (-0.0 just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_value(key):
    """The float32 whose :func:`_order_key` is ``key``."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nan_if(score, has_nan):
    return tl.where(tl.max(has_nan.to(tl.int32), 0) > 0, float("nan"), score)


@triton.jit
def _max_kernel(map_ptr, out_ptr, n, W, sb, sh, sw, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = map_ptr + b.to(tl.int64) * sb
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    has_nan = tl.zeros([BLOCK], tl.int1)
    for start in range(0, n, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        mask = pix < n
        x = _load_pixels(base, pix, W, sh, sw, mask)
        best = tl.maximum(best, tl.where(mask, x, float("-inf")))
        has_nan = has_nan | (x != x)
    score = _nan_if(tl.max(best, 0), has_nan)
    tl.store(out_ptr + b, score.to(out_ptr.dtype.element_ty))


@triton.jit
def _count_at_least(base, n, W, sh, sw, key_min, BLOCK: tl.constexpr):
    """Number of pixels whose key is >= ``key_min``."""
    count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        mask = pix < n
        key = _order_key(_load_pixels(base, pix, W, sh, sw, mask))
        count += (mask & (key >= key_min)).to(tl.int32)
    return tl.sum(count, 0)


@triton.jit
def _topk_mean_kernel(map_ptr, out_ptr, n, k, W, sb, sh, sw, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = map_ptr + b.to(tl.int64) * sb
    # Key of the k-th largest pixel: the largest T with count(key >= T) >= k, built from the top bit down.
    # Flipping the sign bit of INT32_MIN gives 0 and setting any lower clear bit raises a key, so each step
    # tries the next larger candidate.
    threshold = tl.full([], -(2**31), tl.int32)
    one = tl.full([], 1, tl.int32)  # an int32 tensor, so that one << 31 wraps to INT32_MIN
    for i in range(32):
        candidate = threshold ^ (one << (31 - i))
        threshold = tl.where(_count_at_least(base, n, W, sh, sw, candidate, BLOCK) >= k, candidate, threshold)
    above_sum = tl.zeros([BLOCK], tl.float32)
    above_count = tl.zeros([BLOCK], tl.int32)
    has_nan = tl.zeros([BLOCK], tl.int1)
    for start in range(0, n, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        mask = pix < n
        x = _load_pixels(base, pix, W, sh, sw, mask)
        above = mask & (_order_key(x) > threshold)
        above_sum += tl.where(above, x, 0.0)
        above_count += above.to(tl.int32)
        has_nan = has_nan | (x != x)
    ties = k - tl.sum(above_count, 0)
    total = tl.sum(above_sum, 0) + ties.to(tl.float32) * _key_value(threshold)
    score = _nan_if(tl.math.div_rn(total, tl.cast(k, tl.float32)), has_nan)
    tl.store(out_ptr + b, score.to(out_ptr.dtype.element_ty))


def image_score_triton(anomaly_map: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    """Score ``[B]`` (in the map's dtype) of ``[B, H, W]`` maps, any layout: ``"max"`` or ``"topk_mean"`` of ``k``."""
    batch, _, width = anomaly_map.shape
    pixels = anomaly_map.shape[1] * width
    out = torch.empty(batch, dtype=anomaly_map.dtype, device=anomaly_map.device)
    strides = anomaly_map.stride()
    if mode == "max":
        _max_kernel[(batch,)](anomaly_map, out, pixels, width, *strides, BLOCK=_BLOCK)
    else:
        _topk_mean_kernel[(batch,)](anomaly_map, out, pixels, k, width, *strides, BLOCK=_BLOCK)
    return out
