"""Triton KD loss: fused forward (per-row sums, terms and gradient coefficients) and backward (one pass).

Semantics are those of :func:`dmgrd.ops.cosine_kd_loss.cosine_kd_loss_reference`; the forward/backward pair
is what :class:`dmgrd.ops.cosine_kd_loss._CosineKDLoss` expects: coefficients ``[rows, 3]`` with
``dL/dS = a·T + b_s·S`` and ``dL/dT = a·S + b_t·T`` per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dmgrd.kernels.pixel_tiles import batch_axis

from dmgrd.layout import cosine_rows, dense_format
from dmgrd.numerics import COSINE_EPS

_CHUNK = 8192  # flatten: elements of an image's vector per program (fewer for shorter vectors)
_BLOCK = 1024  # flatten: elements per loop step
_ROW_BLOCK = 128  # flatten: chunk partials per loop step when a row's sums are combined


@triton.jit
def _row_term(dot, tt, ss, inv_count, eps):
    """(1 - cos) * inv_count and the gradient coefficients (a, b_s, b_t), as ``kd::row_term`` in C++."""
    raw_t = tl.sqrt_rn(tt)
    raw_s = tl.sqrt_rn(ss)
    nt = tl.maximum(raw_t, eps, propagate_nan=tl.PropagateNan.ALL)
    ns = tl.maximum(raw_s, eps, propagate_nan=tl.PropagateNan.ALL)
    cos = tl.math.div_rn(dot, nt * ns)
    a = -inv_count / (nt * ns)
    # the norm's derivative x / |x| is 0 at x = 0 (and nothing is divided by 0)
    b_s = tl.where(raw_s == 0, 0.0, tl.math.div_rn(cos * inv_count, ns * tl.where(raw_s == 0, 1.0, raw_s)))
    b_t = tl.where(raw_t == 0, 0.0, tl.math.div_rn(cos * inv_count, nt * tl.where(raw_t == 0, 1.0, raw_t)))
    return (1.0 - cos) * inv_count, a, b_s, b_t


@triton.jit
def _flat_sums_kernel(t_ptr, s_ptr, part_ptr, N, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    dot = tl.zeros([BLOCK], tl.float32)
    tt = tl.zeros([BLOCK], tl.float32)
    ss = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, CHUNK, BLOCK):
        k = start + k0 + tl.arange(0, BLOCK)
        mask = k < N
        t = tl.load(t_ptr + b * N + k, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + b * N + k, mask=mask, other=0.0).to(tl.float32)
        dot += t * s
        tt += t * t
        ss += s * s
    out = part_ptr + 3 * (b * tl.num_programs(0) + chunk)
    tl.store(out, tl.sum(dot, 0))
    tl.store(out + 1, tl.sum(tt, 0))
    tl.store(out + 2, tl.sum(ss, 0))


@triton.jit
def _flat_rows_kernel(part_ptr, coeff_ptr, term_ptr, chunks, inv_count, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = part_ptr + 3 * b * chunks
    dot = tl.zeros([BLOCK], tl.float32)
    tt = tl.zeros([BLOCK], tl.float32)
    ss = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, chunks, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < chunks
        dot += tl.load(base + 3 * k, mask=mask, other=0.0)
        tt += tl.load(base + 3 * k + 1, mask=mask, other=0.0)
        ss += tl.load(base + 3 * k + 2, mask=mask, other=0.0)
    term, a, b_s, b_t = _row_term(tl.sum(dot, 0), tl.sum(tt, 0), tl.sum(ss, 0), inv_count, eps)
    tl.store(coeff_ptr + 3 * b, a)
    tl.store(coeff_ptr + 3 * b + 1, b_s)
    tl.store(coeff_ptr + 3 * b + 2, b_t)
    tl.store(term_ptr + b, term)


@triton.jit
def _channel_block(t_ptr, s_ptr, c0, C, ch_stride, pix_off, pix_mask, BLOCK_C: tl.constexpr):
    """Channels ``[c0, c0 + BLOCK_C)`` at the tile's pixels (offsets ``pix_off``): T and S as float32 (0 where
    masked), their offsets and the mask."""
    chan = c0 + tl.arange(0, BLOCK_C)
    mask = (chan < C)[:, None] & pix_mask[None, :]
    offs = chan.to(tl.int64)[:, None] * ch_stride + pix_off[None, :]
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return t, s, offs, mask


@triton.jit
def _pixel_sums_kernel(
    t_ptr, s_ptr, coeff_ptr, term_ptr, C, HW, pix_stride, ch_stride, inv_count, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < HW
    pix_off = b * C * HW + pix.to(tl.int64) * pix_stride
    dot = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    tt = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        t, s, _, _ = _channel_block(t_ptr, s_ptr, c0, C, ch_stride, pix_off, pix_mask, BLOCK_C)
        dot += t * s
        tt += t * t
        ss += s * s
    term, a, b_s, b_t = _row_term(tl.sum(dot, 0), tl.sum(tt, 0), tl.sum(ss, 0), inv_count, eps)
    row = b * HW + pix
    tl.store(coeff_ptr + 3 * row, a, mask=pix_mask)
    tl.store(coeff_ptr + 3 * row + 1, b_s, mask=pix_mask)
    tl.store(coeff_ptr + 3 * row + 2, b_t, mask=pix_mask)
    tl.store(term_ptr + b * tl.num_programs(0) + tile, tl.sum(tl.where(pix_mask, term, 0.0), 0))


@triton.jit
def _flat_grad_kernel(
    t_ptr, s_ptr, gs_ptr, gt_ptr, coeff_ptr, grad_ptr, N,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TEACHER: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    g = tl.load(grad_ptr)
    a = g * tl.load(coeff_ptr + 3 * b)
    b_s = g * tl.load(coeff_ptr + 3 * b + 1)
    b_t = g * tl.load(coeff_ptr + 3 * b + 2)
    for k0 in range(0, CHUNK, BLOCK):
        k = chunk * CHUNK + k0 + tl.arange(0, BLOCK)
        mask = k < N
        offs = b * N + k
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gs_ptr + offs, (a * t + b_s * s).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            tl.store(gt_ptr + offs, (a * s + b_t * t).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_grad_kernel(
    t_ptr, s_ptr, gs_ptr, gt_ptr, coeff_ptr, grad_ptr, C, HW, pix_stride, ch_stride,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, TEACHER: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < HW
    pix_off = b * C * HW + pix.to(tl.int64) * pix_stride
    row = b * HW + pix
    g = tl.load(grad_ptr)
    a = (g * tl.load(coeff_ptr + 3 * row, mask=pix_mask, other=0.0))[None, :]
    b_s = (g * tl.load(coeff_ptr + 3 * row + 1, mask=pix_mask, other=0.0))[None, :]
    b_t = (g * tl.load(coeff_ptr + 3 * row + 2, mask=pix_mask, other=0.0))[None, :]
    for c0 in range(0, C, BLOCK_C):
        t, s, offs, mask = _channel_block(t_ptr, s_ptr, c0, C, ch_stride, pix_off, pix_mask, BLOCK_C)
        tl.store(gs_ptr + offs, (a * t + b_s * s).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            tl.store(gt_ptr + offs, (a * s + b_t * t).to(gt_ptr.dtype.element_ty), mask=mask)


class _Level:
    """One level in its kernel layout, with the launch geometry of the pixel kernels."""

    def __init__(self, t: torch.Tensor, s: torch.Tensor):
        self.format = dense_format(s)
        self.t = t.contiguous(memory_format=self.format)
        self.s = s.contiguous(memory_format=self.format)
        self.batch, self.channels, height, width = t.shape
        self.pixels = height * width
        self.numel = self.channels * self.pixels  # per image
        channels_last = self.format == torch.channels_last
        self.pix_stride, self.ch_stride = (self.channels, 1) if channels_last else (1, self.pixels)
        # the long side of the tile along the memory-contiguous axis
        self.block_c, self.block_p = (64, 32) if channels_last else (16, 128)
        self.chunk = min(_CHUNK, triton.next_power_of_2(self.numel))
        self.block = min(_BLOCK, self.chunk)

    def pieces(self, pixel: bool) -> int:
        """Programs per image: pixel tiles or flatten chunks."""
        return triton.cdiv(self.pixels, self.block_p) if pixel else triton.cdiv(self.numel, self.chunk)

    def rows(self, pixel: bool) -> int:
        return self.batch * self.pixels if pixel else self.batch

    def empty_grad(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device, memory_format=self.format)


def _level_forward(lv: _Level, pixel: bool, coeffs: torch.Tensor, terms: torch.Tensor) -> None:
    grid = (lv.pieces(pixel), batch_axis(lv.batch, "cosine_kd_loss"))
    if pixel:
        _pixel_sums_kernel[grid](
            lv.t, lv.s, coeffs, terms, lv.channels, lv.pixels, lv.pix_stride, lv.ch_stride,
            1.0 / (lv.batch * lv.pixels), COSINE_EPS, BLOCK_C=lv.block_c, BLOCK_P=lv.block_p,
        )
        return
    partial = torch.empty((lv.batch, grid[0], 3), dtype=torch.float32, device=lv.t.device)
    _flat_sums_kernel[grid](lv.t, lv.s, partial, lv.numel, CHUNK=lv.chunk, BLOCK=lv.block)
    _flat_rows_kernel[(lv.batch,)](partial, coeffs, terms, grid[0], 1.0 / lv.batch, COSINE_EPS, BLOCK=_ROW_BLOCK)


def cosine_kd_loss_forward_triton(
    teacher: list[torch.Tensor], student: list[torch.Tensor], reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 loss, float32 coefficients ``[rows, 3]``) of float16/bfloat16/float32 pyramids, any layout."""
    pixel = reduction == "pixel"
    levels = [_Level(t, s) for t, s in zip(teacher, student, strict=True)]
    device = teacher[0].device
    coeffs = torch.empty((cosine_rows(teacher, reduction), 3), dtype=torch.float32, device=device)
    # One term per flatten row, one partial sum per pixel-tile program.
    term_sizes = [lv.batch * (lv.pieces(pixel) if pixel else 1) for lv in levels]
    terms = torch.empty(sum(term_sizes), dtype=torch.float32, device=device)
    row_coeffs = coeffs.split([lv.rows(pixel) for lv in levels])
    for lv, c, term in zip(levels, row_coeffs, terms.split(term_sizes), strict=True):
        _level_forward(lv, pixel, c, term)
    return terms.sum(), coeffs


def cosine_kd_loss_backward_triton(
    grad: torch.Tensor, teacher: list[torch.Tensor], student: list[torch.Tensor], coeffs: torch.Tensor,
    reduction: str, teacher_grad: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of the student features (and of the teacher's when ``teacher_grad``), in their kernel layout."""
    pixel = reduction == "pixel"
    levels = [_Level(t, s) for t, s in zip(teacher, student, strict=True)]
    grad = grad.to(torch.float32).reshape(1)
    grads_s, grads_t = [], []
    for lv, c in zip(levels, coeffs.split([lv.rows(pixel) for lv in levels]), strict=True):
        gs = lv.empty_grad(lv.s)
        gt = lv.empty_grad(lv.t) if teacher_grad else gs
        grid = (lv.pieces(pixel), batch_axis(lv.batch, "cosine_kd_loss"))
        if pixel:
            _pixel_grad_kernel[grid](
                lv.t, lv.s, gs, gt, c, grad, lv.channels, lv.pixels, lv.pix_stride, lv.ch_stride,
                BLOCK_C=lv.block_c, BLOCK_P=lv.block_p, TEACHER=teacher_grad,
            )
        else:
            _flat_grad_kernel[grid](lv.t, lv.s, gs, gt, c, grad, lv.numel, CHUNK=lv.chunk, BLOCK=lv.block,
                                    TEACHER=teacher_grad)
        grads_s.append(gs)
        if teacher_grad:
            grads_t.append(gt)
    return grads_s, grads_t
