"""Triton greedy k-center step: squared distances to the new center, lowered ``min_dist`` and its argmax.

Semantics are those of :func:`dmgrd.ops.coreset_update.coreset_update_reference`: float32 accumulation, NaN counts as
the largest distance, equal distances resolve to the lowest index. The argmax compares int32 order keys, so
both passes reduce with plain ``max`` and ``min``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_ROWS = 64  # rows per program of the update pass
_BLOCK_DIM = 64  # features loaded per step
_BLOCK_REDUCE = 1024  # block candidates per step of the final reduction
_NO_KEY = -(2**31)  # key of masked lanes, below every value's
_NO_ROW = 2**62  # index of masked lanes, above every row's


@triton.jit
def _order_key(x):
    """int32 key of float32 ``x`` in argmax order: the integer order is the float order, -0.0 equals +0.0 and
    every NaN has the largest key."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _best(key, index, NO_ROW: tl.constexpr):
    """Largest key of a 1-D block and the lowest index holding it."""
    top = tl.max(key, 0)
    return top, tl.min(tl.where(key == top, index, NO_ROW), 0)


@triton.jit
def _update_kernel(points_ptr, center_ptr, min_ptr, new_min_ptr, block_key_ptr, block_index_ptr, rows, dim,
                   stride_row, stride_col, stride_center, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
                   NO_KEY: tl.constexpr, NO_ROW: tl.constexpr):
    block = tl.program_id(0)
    row = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row < rows
    base = points_ptr + row.to(tl.int64)[:, None] * stride_row
    dist = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, dim, BLOCK_DIM):
        col = start + tl.arange(0, BLOCK_DIM)
        col_mask = col < dim
        p = tl.load(base + col[None, :] * stride_col, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        c = tl.load(center_ptr + col * stride_center, mask=col_mask, other=0.0)
        diff = p.to(tl.float32) - c.to(tl.float32)[None, :]
        dist += tl.sum(diff * diff, axis=1)
    old = tl.load(min_ptr + row, mask=row_mask, other=0.0)
    new = tl.where((dist < old) | (dist != dist), dist, old)
    tl.store(new_min_ptr + row, new, mask=row_mask)
    key = tl.where(row_mask, _order_key(new), NO_KEY)
    top, best = _best(key, tl.where(row_mask, row.to(tl.int64), NO_ROW), NO_ROW)
    tl.store(block_key_ptr + block, top)
    tl.store(block_index_ptr + block, best)


@triton.jit
def _farthest_kernel(block_key_ptr, block_index_ptr, out_ptr, blocks, BLOCK: tl.constexpr, NO_KEY: tl.constexpr,
                     NO_ROW: tl.constexpr):
    best_key = tl.full([BLOCK], NO_KEY, tl.int32)
    best_index = tl.full([BLOCK], NO_ROW, tl.int64)
    for start in range(0, blocks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < blocks
        key = tl.load(block_key_ptr + offs, mask=mask, other=NO_KEY)
        index = tl.load(block_index_ptr + offs, mask=mask, other=NO_ROW)
        # blocks come in row order: a later block replaces the kept one only with a strictly larger key
        take = key > best_key
        best_key = tl.where(take, key, best_key)
        best_index = tl.where(take, index, best_index)
    _, farthest = _best(best_key, best_index, NO_ROW)
    tl.store(out_ptr, farthest)


def coreset_update_triton(points: torch.Tensor, center: torch.Tensor,
                          min_dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(minimum(min_dist, |points - center|^2), argmax)`` for ``[N, D]`` points of any layout (float32 min_dist)."""
    rows, dim = points.shape
    min_dist = min_dist.contiguous()
    blocks = triton.cdiv(rows, _BLOCK_ROWS)
    new_min = torch.empty_like(min_dist)
    block_key = torch.empty(blocks, dtype=torch.int32, device=points.device)
    block_index = torch.empty(blocks, dtype=torch.int64, device=points.device)
    farthest = torch.empty((), dtype=torch.int64, device=points.device)
    _update_kernel[(blocks,)](points, center, min_dist, new_min, block_key, block_index, rows, dim, points.stride(0),
                              points.stride(1), center.stride(0), BLOCK_ROWS=_BLOCK_ROWS, BLOCK_DIM=_BLOCK_DIM,
                              NO_KEY=_NO_KEY, NO_ROW=_NO_ROW)
    _farthest_kernel[(1,)](block_key, block_index, farthest, blocks, BLOCK=_BLOCK_REDUCE, NO_KEY=_NO_KEY,
                           NO_ROW=_NO_ROW)
    return new_min, farthest
