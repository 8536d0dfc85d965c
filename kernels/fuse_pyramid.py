"""Triton fuse_pyramid, forward and backward.

Semantics are those of the torch reference in :mod:`dmgrd.ops.fuse_pyramid`. The passes over ``[B, C, H, W]``
tensors run one program per block of pixels of one image over channel tiles (:mod:`dmgrd.kernels.pixel_tiles`);
the per-pixel mask maps are float32 ``[B, H*W]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dmgrd.kernels.pixel_tiles import BLOCK_C, BLOCK_P, pixel_grid, tile

from dmgrd.layout import dense_like

_BLOCK = 256  # pixels per program of the per-pixel mask kernels


@triton.jit
def _upsample_taps(b, y, x, Hc, Wc, scale_h, scale_w, step):
    """Offsets of the 4 coarse pixels and the 2 + 2 weights that bilinear (align_corners=True) reads at (y, x);
    ``step`` is 0 for a copy (same size)."""
    sy = y.to(tl.float32) * scale_h
    sx = x.to(tl.float32) * scale_w
    y0 = sy.to(tl.int32)  # coordinates are >= 0: truncation is floor
    x0 = sx.to(tl.int32)
    y1 = tl.minimum(y0 + step, Hc - 1)
    x1 = tl.minimum(x0 + step, Wc - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    plane = b * Hc * Wc
    return plane + y0 * Wc + x0, plane + y0 * Wc + x1, plane + y1 * Wc + x0, plane + y1 * Wc + x1, ly, lx


@triton.jit
def _bilinear(coarse_ptr, o00, o01, o10, o11, ly, lx, mask):
    top = (1.0 - lx) * tl.load(coarse_ptr + o00, mask=mask) + lx * tl.load(coarse_ptr + o01, mask=mask)
    bottom = (1.0 - lx) * tl.load(coarse_ptr + o10, mask=mask) + lx * tl.load(coarse_ptr + o11, mask=mask)
    return (1.0 - ly) * top + ly * bottom


@triton.jit
def _block_sigmoid(a_ptr, P, W, a_sb, a_sh, a_sw, BLOCK: tl.constexpr):
    """This program's image b, pixels (flat index, mask, row, column) and sigmoid of their logits."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < P
    y = pix // W
    x = pix % W
    s = tl.sigmoid(tl.load(a_ptr + b * a_sb + y * a_sh + x * a_sw, mask=mask).to(tl.float32))
    return b, pix, mask, y, x, s


@triton.jit
def _mask_kernel(a_ptr, coarse_ptr, m_ptr, P, W, a_sb, a_sh, a_sw, Hc, Wc, scale_h, scale_w, step,
                 HAS_COARSE: tl.constexpr, BLOCK: tl.constexpr):
    b, pix, mask, y, x, m = _block_sigmoid(a_ptr, P, W, a_sb, a_sh, a_sw, BLOCK)
    if HAS_COARSE:
        o00, o01, o10, o11, ly, lx = _upsample_taps(b, y, x, Hc, Wc, scale_h, scale_w, step)
        m = m * _bilinear(coarse_ptr, o00, o01, o10, o11, ly, lx, mask)
    tl.store(m_ptr + b * P + pix, m, mask=mask)


@triton.jit
def _gate_kernel(f_ptr, m_ptr, out_ptr, C, P, W, f_sb, f_sc, f_sh, f_sw, o_sb, o_sc, o_sh, o_sw,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = tl.load(m_ptr + b * P + pix, mask=pix < P)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        f_offsets, mask = tile(chan, pix, C, P, W, f_sc, f_sh, f_sw)
        o_offsets, _ = tile(chan, pix, C, P, W, o_sc, o_sh, o_sw)
        f = tl.load(f_ptr + b * f_sb + f_offsets, mask=mask).to(tl.float32)
        tl.store(out_ptr + b * o_sb + o_offsets, (f * m[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_backward_kernel(g_ptr, f_ptr, m_ptr, gf_ptr, gm_ptr, C, P, W,
                          g_sb, g_sc, g_sh, g_sw, f_sb, f_sc, f_sh, f_sw, gf_sb, gf_sc, gf_sh, gf_sw,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = tl.load(m_ptr + b * P + pix, mask=pix < P)
    dot = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        g_offsets, mask = tile(chan, pix, C, P, W, g_sc, g_sh, g_sw)
        f_offsets, _ = tile(chan, pix, C, P, W, f_sc, f_sh, f_sw)
        gf_offsets, _ = tile(chan, pix, C, P, W, gf_sc, gf_sh, gf_sw)
        g = tl.load(g_ptr + b * g_sb + g_offsets, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + b * f_sb + f_offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(gf_ptr + b * gf_sb + gf_offsets, (g * m[None, :]).to(gf_ptr.dtype.element_ty), mask=mask)
        dot += g * f
    tl.store(gm_ptr + b * P + pix, tl.sum(dot, 0), mask=pix < P)


@triton.jit
def _mask_backward_kernel(a_ptr, gm_ptr, coarse_ptr, coarse_grad_ptr, ga_ptr, P, W, a_sb, a_sh, a_sw,
                          Hc, Wc, scale_h, scale_w, step, HAS_COARSE: tl.constexpr, BLOCK: tl.constexpr):
    b, pix, mask, y, x, s = _block_sigmoid(a_ptr, P, W, a_sb, a_sh, a_sw, BLOCK)
    grad_mask = tl.load(gm_ptr + b * P + pix, mask=mask)
    grad_s = grad_mask
    if HAS_COARSE:
        o00, o01, o10, o11, ly, lx = _upsample_taps(b, y, x, Hc, Wc, scale_h, scale_w, step)
        grad_s = grad_mask * _bilinear(coarse_ptr, o00, o01, o10, o11, ly, lx, mask)
        up = grad_mask * s
        tl.atomic_add(coarse_grad_ptr + o00, (1.0 - ly) * (1.0 - lx) * up, mask=mask)
        tl.atomic_add(coarse_grad_ptr + o01, (1.0 - ly) * lx * up, mask=mask)
        tl.atomic_add(coarse_grad_ptr + o10, ly * (1.0 - lx) * up, mask=mask)
        tl.atomic_add(coarse_grad_ptr + o11, ly * lx * up, mask=mask)
    tl.store(ga_ptr + b * P + pix, (grad_s * (1.0 - s) * s).to(ga_ptr.dtype.element_ty), mask=mask)


def _coarse_args(logits: list[torch.Tensor], level: int) -> tuple[int, int, float, float, int]:
    """(Hc, Wc, scale_h, scale_w, step) of the upsample from level + 1 to level (dummies for the coarsest)."""
    if level + 1 == len(logits):
        return 1, 1, 0.0, 0.0, 0
    (hc, wc), (h, w) = logits[level + 1].shape[2:], logits[level].shape[2:]
    scale = [(i - 1) / (o - 1) if o > 1 else 0.0 for i, o in ((hc, h), (wc, w))]
    return hc, wc, scale[0], scale[1], 0 if (hc, wc) == (h, w) else 1


def _attention_masks(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 masks ``[B, H_l * W_l]`` of every level, computed coarse to fine."""
    masks: list[torch.Tensor] = [None] * len(logits)
    for level in reversed(range(len(logits))):
        a = logits[level]
        batch, _, height, width = a.shape
        masks[level] = torch.empty((batch, height * width), dtype=torch.float32, device=a.device)
        has_coarse = level + 1 < len(logits)
        coarse = masks[level + 1] if has_coarse else masks[level]
        _mask_kernel[pixel_grid(a, _BLOCK)](
            a, coarse, masks[level], height * width, width, a.stride(0), a.stride(2), a.stride(3),
            *_coarse_args(logits, level), HAS_COARSE=has_coarse, BLOCK=_BLOCK)
    return masks


def fuse_pyramid_triton(features: list[torch.Tensor], logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[f_l * m_l]`` with the attention masks of ``logits``."""
    outputs = []
    for f, m in zip(features, _attention_masks(logits), strict=True):
        out = dense_like(f)
        _gate_kernel[pixel_grid(f, BLOCK_P)](f, m, out, f.shape[1], f.shape[2] * f.shape[3], f.shape[3],
                                               *f.stride(), *out.stride(), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
        outputs.append(out)
    return outputs


def fuse_pyramid_backward_triton(grads: list[torch.Tensor], features: list[torch.Tensor],
                                 logits: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of :func:`fuse_pyramid_triton` with respect to features and logits."""
    masks = _attention_masks(logits)
    grad_features, grad_masks = [], []
    for g, f, m in zip(grads, features, masks, strict=True):
        grad_f, grad_m = dense_like(f), torch.empty_like(m)
        _gate_backward_kernel[pixel_grid(f, BLOCK_P)](
            g, f, m, grad_f, grad_m, f.shape[1], f.shape[2] * f.shape[3], f.shape[3],
            *g.stride(), *f.stride(), *grad_f.stride(), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
        grad_features.append(grad_f)
        grad_masks.append(grad_m)
    # Fine to coarse: each level adds its share of the gradient of up(coarser mask) to the coarser level's.
    grad_logits = []
    for level, a in enumerate(logits):
        has_coarse = level + 1 < len(logits)
        coarse = level + 1 if has_coarse else level
        grad_a = torch.empty_like(a, memory_format=torch.contiguous_format)
        _mask_backward_kernel[pixel_grid(a, _BLOCK)](
            a, grad_masks[level], masks[coarse], grad_masks[coarse], grad_a, a.shape[2] * a.shape[3], a.shape[3],
            a.stride(0), a.stride(2), a.stride(3), *_coarse_args(logits, level), HAS_COARSE=has_coarse,
            BLOCK=_BLOCK)
        grad_logits.append(grad_a)
    return grad_features, grad_logits
