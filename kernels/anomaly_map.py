"""Triton anomaly map: per-level cosine distance, bilinear upsample and level combine, separable Gaussian blur.

Semantics are those of :func:`dmgrd.ops.anomaly_map.anomaly_map_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from dmgrd.kernels.pixel_tiles import batch_axis

from dmgrd.numerics import COSINE_EPS, gaussian_weights

_REDUCE_CODES = {"sum": 0, "mean": 1, "mul": 2}
_MEAN = tl.constexpr(_REDUCE_CODES["mean"])
_MUL = tl.constexpr(_REDUCE_CODES["mul"])
_BLOCK = 1024  # output pixels per program of the upsample and blur kernels


@triton.jit
def _cosine_distance_kernel(
    t_ptr, s_ptr, d_ptr, C, W, HW,
    t_sb, t_sc, t_sh, t_sw,
    s_sb, s_sc, s_sh, s_sw,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < HW
    h = (pix // W).to(tl.int64)  # int64 offsets: an image's C x H x W may exceed 2^31 elements
    w = pix % W
    t_pix = t_ptr + b * t_sb + h * t_sh + w * t_sw
    s_pix = s_ptr + b * s_sb + h * s_sh + w * s_sw
    dot = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    tt = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        mask = (chan < C)[:, None] & pix_mask[None, :]
        t = tl.load(t_pix[None, :] + chan.to(tl.int64)[:, None] * t_sc, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_pix[None, :] + chan.to(tl.int64)[:, None] * s_sc, mask=mask, other=0.0).to(tl.float32)
        dot += t * s
        tt += t * t
        ss += s * s
    t_norm = tl.maximum(tl.sqrt_rn(tl.sum(tt, 0)), eps, propagate_nan=tl.PropagateNan.ALL)
    s_norm = tl.maximum(tl.sqrt_rn(tl.sum(ss, 0)), eps, propagate_nan=tl.PropagateNan.ALL)
    d = 1.0 - tl.math.div_rn(tl.sum(dot, 0), t_norm * s_norm)
    tl.store(d_ptr + b * HW + pix, d, mask=pix_mask)


@triton.jit
def _bilinear(dist_ptr, level_ptr, scale_ptr, level, b, oy, ox, mask):
    """Level ``level``'s distance map of image ``b`` sampled at output pixels (oy, ox), align_corners=True."""
    offset = tl.load(level_ptr + 4 * level)
    h_in = tl.load(level_ptr + 4 * level + 1)
    w_in = tl.load(level_ptr + 4 * level + 2)
    step = tl.load(level_ptr + 4 * level + 3)  # 0 for a level copied as is (already at the output size)
    sy = oy.to(tl.float32) * tl.load(scale_ptr + 2 * level)
    sx = ox.to(tl.float32) * tl.load(scale_ptr + 2 * level + 1)
    # Source coordinates are >= 0, so truncation is floor.
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    y1 = tl.minimum(y0 + step, h_in - 1)
    x1 = tl.minimum(x0 + step, w_in - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    row0 = dist_ptr + offset + b * h_in * w_in + y0 * w_in
    row1 = dist_ptr + offset + b * h_in * w_in + y1 * w_in
    top = (1.0 - lx) * tl.load(row0 + x0, mask=mask) + lx * tl.load(row0 + x1, mask=mask)
    bottom = (1.0 - lx) * tl.load(row1 + x0, mask=mask) + lx * tl.load(row1 + x1, mask=mask)
    return (1.0 - ly) * top + ly * bottom


@triton.jit
def _upsample_combine_kernel(
    dist_ptr, level_ptr, scale_ptr, out_ptr, num_levels, Wo, HWo,
    REDUCE: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < HWo
    oy = pix // Wo
    ox = pix % Wo
    if REDUCE == _MUL:  # noqa: SIM108 (a branch on a constexpr: Triton compiles one side)
        acc = tl.full([BLOCK], 1.0, tl.float32)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    for level in range(num_levels):
        d = _bilinear(dist_ptr, level_ptr, scale_ptr, level, b, oy, ox, mask)
        if REDUCE == _MUL:
            acc *= d
        else:
            acc += d
    if REDUCE == _MEAN:
        acc = tl.math.div_rn(acc, tl.cast(num_levels, tl.float32))
    tl.store(out_ptr + b * HWo + pix, acc, mask=mask)


@triton.jit
def _blur_kernel(src_ptr, dst_ptr, taps_ptr, num_taps, size, inner, plane, BLOCK: tl.constexpr):
    """One pass of the separable blur along the axis of length ``size`` and element stride ``inner``."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < plane
    pos = (pix // inner) % size
    line = b * plane + pix - pos * inner
    radius = num_taps // 2
    period = 2 * size
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(num_taps):
        # scipy mode "reflect" (half-sample symmetric), repeated when the radius exceeds the size.
        m = (pos + j - radius) % period
        m = tl.where(m < 0, m + period, m)
        m = tl.where(m >= size, period - 1 - m, m)
        acc += tl.load(taps_ptr + j) * tl.load(src_ptr + line + m * inner, mask=mask)
    tl.store(dst_ptr + b * plane + pix, acc, mask=mask)


def _cosine_blocks(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): the long side of the tile goes along the memory-contiguous axis."""
    channels_inner = t.stride(1) < min(t.stride(2), t.stride(3))
    return (64, 32) if channels_inner else (16, 128)


def _cosine_distances(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """All levels' ``[B, H_l * W_l]`` float32 cosine-distance maps, one after the other in one flat buffer."""
    batch = teacher[0].shape[0]
    sizes = [batch * t.shape[2] * t.shape[3] for t in teacher]
    dist = torch.empty(sum(sizes), dtype=torch.float32, device=teacher[0].device)
    for t, s, d in zip(teacher, student, dist.split(sizes), strict=True):
        _, channels, height, width = t.shape
        block_c, block_p = _cosine_blocks(t)
        grid = (triton.cdiv(height * width, block_p), batch_axis(batch, "anomaly_map"))
        _cosine_distance_kernel[grid](
            t, s, d, channels, width, height * width, *t.stride(), *s.stride(), COSINE_EPS,
            BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return dist


def _align_corners_scale(in_size: int, out_size: int) -> float:
    # (in-1)/(out-1) rounded once to float32 equals ATen's float32 division.
    return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0


def _level_tables(teacher: Sequence[torch.Tensor], out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per level: (offset in the distance buffer, H, W, neighbour step) as int64 and (row scale, column scale)
    as float32. A level already at the output size is copied, as ATen does: its neighbour step is 0 so a NaN
    cannot leak into a zero-weight neighbour."""
    batch, device = teacher[0].shape[0], teacher[0].device
    rows, scales, offset = [], [], 0
    for t in teacher:
        height, width = t.shape[2:]
        rows.append((offset, height, width, int((height, width) != tuple(out_size))))
        scales.append((_align_corners_scale(height, out_size[0]), _align_corners_scale(width, out_size[1])))
        offset += batch * height * width
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(scales, dtype=torch.float32, device=device),
    )


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> None:
    """Blur ``[B, 1, H, W]`` float32 contiguous maps in place: a horizontal then a vertical pass."""
    batch, _, height, width = maps.shape
    taps = gaussian_weights(sigma, torch.float32, maps.device)
    tmp = torch.empty_like(maps)
    grid = (triton.cdiv(height * width, _BLOCK), batch_axis(batch, "anomaly_map"))
    _blur_kernel[grid](maps, tmp, taps, taps.numel(), width, 1, height * width, BLOCK=_BLOCK)
    _blur_kernel[grid](tmp, maps, taps, taps.numel(), height, width, height * width, BLOCK=_BLOCK)


def anomaly_map_triton(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    out_size: tuple[int, int],
    reduce: str,
    sigma: float,
) -> torch.Tensor:
    """Anomaly map ``[B, 1, H, W]`` (float32) of float16/bfloat16/float32 feature pyramids, any memory layout."""
    batch = teacher[0].shape[0]
    height, width = out_size
    dist = _cosine_distances(teacher, student)
    levels, scales = _level_tables(teacher, out_size)
    out = torch.empty((batch, 1, height, width), dtype=torch.float32, device=teacher[0].device)
    grid = (triton.cdiv(height * width, _BLOCK), batch_axis(batch, "anomaly_map"))
    _upsample_combine_kernel[grid](
        dist, levels, scales, out, len(teacher), width, height * width,
        REDUCE=_REDUCE_CODES[reduce], BLOCK=_BLOCK,
    )
    if sigma > 0:
        _gaussian_blur(out, sigma)
    return out
