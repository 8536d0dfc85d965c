"""Triton memory read-out, flash-attention style: forward with online softmax, backward recomputing from the lse.

Semantics are those of :func:`dmgrd.ops.memory_readout.memory_readout_reference`; the algorithm is
described in :mod:`dmgrd.ops.memory_readout`. Grids: forward and query gradient ``(query tiles, D chunks of
the output)``; bank gradient ``(bank tiles, D chunks, query splits)``, each split summing privately (no
atomics) before the splits are added.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmgrd._extension import triton_interpreted
from dmgrd.numerics import NORM_EPS

_TARGET_PROGRAMS = 1024  # bank-gradient programs aimed at when choosing the number of query splits


@triton.jit
def _tile_indices(rows_total, D, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Rows (int64) of program axis 0's tile and the D chunk of program axis 1, each with its mask."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    dcols = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return rows, rows < rows_total, dcols, dcols < D


@triton.jit
def _row_norms(x_ptr, rows, row_mask, D, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Euclidean norms of rows ``rows`` (int64) of the row-major ``[*, D]`` x, in float32."""
    total = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :],
                    other=0.0).to(tl.float32)
        total += tl.sum(x * x, 1)
    return tl.sqrt(total)


@triton.jit
def _row_dots(x_ptr, y_ptr, rows, row_mask, D, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``<x_i, y_i>`` of rows ``rows`` of two row-major ``[*, D]`` tensors, in float32."""
    total = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        offsets = rows[:, None] * D + cols[None, :]
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(x * y, 1)
    return total


@triton.jit
def _dots(x_ptr, x_rows, x_mask, y_ptr, y_rows, y_mask, D, PRECISION: tl.constexpr,
          BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_X, BLOCK_Y]`` raw dot products of rows of x with rows of y (row-major, D columns), float32."""
    acc = tl.zeros([BLOCK_X, BLOCK_Y], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = (cols < D)[None, :]
        x = tl.load(x_ptr + x_rows[:, None] * D + cols[None, :], mask=x_mask[:, None] & col_mask, other=0.0)
        y = tl.load(y_ptr + y_rows[:, None] * D + cols[None, :], mask=y_mask[:, None] & col_mask, other=0.0)
        acc += tl.dot(x, tl.trans(y), input_precision=PRECISION)
    return acc


@triton.jit
def _columns(x_ptr, rows, row_mask, cols, col_mask, D):
    """The ``[rows, cols]`` block of the row-major ``[*, D]`` x."""
    return tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _forward_kernel(
    q_ptr, m_ptr, inv_m_ptr, out_ptr, lse_ptr, qnorm_ptr, N, M, D, inv_t, eps,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rows, row_mask, dcols, dmask = _tile_indices(N, D, BLOCK_N, BLOCK_DV)
    norm = _row_norms(q_ptr, rows, row_mask, D, BLOCK_N, BLOCK_K)
    scale = inv_t / tl.maximum(norm, eps)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for j0 in range(0, M, BLOCK_M):
        items = (j0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        item_mask = items < M
        inv_m = tl.load(inv_m_ptr + items, mask=item_mask, other=0.0)
        s = _dots(q_ptr, rows, row_mask, m_ptr, items, item_mask, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        s = tl.where(item_mask[None, :], s * scale[:, None] * inv_m[None, :], float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(s - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, 1)
        run_max = new_max
        v = _columns(m_ptr, items, item_mask, dcols, dmask, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out = acc / run_sum[:, None]
    tl.store(out_ptr + rows[:, None] * D + dcols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_mask)
        tl.store(qnorm_ptr + rows, norm, mask=row_mask)


@triton.jit
def _query_grad_kernel(
    q_ptr, m_ptr, inv_m_ptr, out_ptr, do_ptr, lse_ptr, qnorm_ptr, dq_ptr, delta_ptr, N, M, D, inv_t, eps,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rows, row_mask, dcols, dmask = _tile_indices(N, D, BLOCK_N, BLOCK_DV)
    norm = tl.load(qnorm_ptr + rows, mask=row_mask, other=1.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    delta = _row_dots(do_ptr, out_ptr, rows, row_mask, D, BLOCK_N, BLOCK_K)
    inv_q = 1.0 / tl.maximum(norm, eps)
    scale = inv_q * inv_t
    score_grad = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)  # sum_j dS_ij m_j / |m_j|
    for j0 in range(0, M, BLOCK_M):
        items = (j0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        item_mask = items < M
        inv_m = tl.load(inv_m_ptr + items, mask=item_mask, other=0.0)
        s = _dots(q_ptr, rows, row_mask, m_ptr, items, item_mask, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        dp = _dots(do_ptr, rows, row_mask, m_ptr, items, item_mask, D, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        s = s * scale[:, None] * inv_m[None, :]
        p = tl.where(item_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        score_grad += tl.sum(ds * s, 1)
        v = _columns(m_ptr, items, item_mask, dcols, dmask, D)
        keys = (v * inv_m[:, None]).to(v.dtype)
        acc += tl.dot(ds.to(v.dtype), keys, input_precision=PRECISION)
    q = _columns(q_ptr, rows, row_mask, dcols, dmask, D).to(tl.float32)
    weight = tl.where(norm >= eps, score_grad * inv_q * inv_q, 0.0)
    dq = acc * scale[:, None] - q * weight[:, None]
    tl.store(dq_ptr + rows[:, None] * D + dcols[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(delta_ptr + rows, delta, mask=row_mask)


@triton.jit
def _bank_grad_kernel(
    q_ptr, m_ptr, inv_m_ptr, do_ptr, lse_ptr, qnorm_ptr, delta_ptr, partial_ptr, score_grad_ptr,
    N, M, D, inv_t, eps, tiles_per_split,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    split = tl.program_id(2)
    items, item_mask, dcols, dmask = _tile_indices(M, D, BLOCK_M, BLOCK_DV)
    inv_m = tl.load(inv_m_ptr + items, mask=item_mask, other=0.0)
    score_grad = tl.zeros([BLOCK_M], tl.float32)
    values = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # sum_i P_ij dO_i
    keys = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # sum_i dS_ij q_i / |q_i|
    first = split * tiles_per_split * BLOCK_N
    for i0 in range(first, tl.minimum(first + tiles_per_split * BLOCK_N, N), BLOCK_N):
        rows = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_mask = rows < N
        norm = tl.load(qnorm_ptr + rows, mask=row_mask, other=1.0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
        inv_q = 1.0 / tl.maximum(norm, eps)
        s = _dots(m_ptr, items, item_mask, q_ptr, rows, row_mask, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        dp = _dots(m_ptr, items, item_mask, do_ptr, rows, row_mask, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        s = s * (inv_m * inv_t)[:, None] * inv_q[None, :]
        p = tl.where(row_mask[None, :], tl.exp(s - lse[None, :]), 0.0)
        ds = p * (dp - delta[None, :])
        score_grad += tl.sum(ds * s, 1)
        do = _columns(do_ptr, rows, row_mask, dcols, dmask, D)
        q = _columns(q_ptr, rows, row_mask, dcols, dmask, D)
        values += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        keys += tl.dot(ds.to(q.dtype), (q * inv_q[:, None]).to(q.dtype), input_precision=PRECISION)
    grad = values + keys * (inv_m * inv_t)[:, None]
    offsets = (split * M + items)[:, None] * D + dcols[None, :]
    tl.store(partial_ptr + offsets, grad, mask=item_mask[:, None] & dmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(score_grad_ptr + split * M + items, score_grad, mask=item_mask)


def _config(dim: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and dot precision (float32 inputs are multiplied in full float32, not TF32).

    Untuned: no GPU was at hand when these were chosen; 8 warps keep the bank-gradient kernel's two
    ``[BLOCK_M, BLOCK_DV]`` float32 accumulators in registers.
    """
    width = max(16, triton.next_power_of_2(dim))
    blocks = {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": min(width, 64), "BLOCK_DV": min(width, 128)}
    if triton_interpreted():  # small tiles: the interpreter is slow and tests then cover the tiling on tiny shapes
        blocks = dict.fromkeys(blocks, 16)
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32", "num_warps": 8, **blocks}


def _inverse_norms(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per memory item: 1 / max(|m|, eps), and 1 / |m|^2 where the norm is not clamped, else 0 (float32)."""
    norm = bank.float().norm(dim=1)
    inverse = norm.clamp_min(NORM_EPS).reciprocal()
    return inverse, torch.where(norm >= NORM_EPS, inverse.square(), 0.0)


def memory_readout_forward(query: torch.Tensor, bank: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out ``[N, D]``, lse ``[N]``, query norms ``[N]``) for float16/bfloat16/float32 inputs (float32 rows)."""
    query, bank = query.contiguous(), bank.contiguous()
    (n, dim), items = query.shape, bank.shape[0]
    inverse, _ = _inverse_norms(bank)
    out = torch.empty_like(query)
    lse = torch.empty(n, dtype=torch.float32, device=query.device)
    query_norm = torch.empty_like(lse)
    config = _config(dim, query.dtype)
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(dim, config["BLOCK_DV"]))
    _forward_kernel[grid](query, bank, inverse, out, lse, query_norm, n, items, dim, 1.0 / temperature, NORM_EPS,
                          **config)
    return out, lse, query_norm


def memory_readout_backward(grad_out: torch.Tensor, query: torch.Tensor, bank: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, query_norm: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_query, grad_bank) from the forward's saved tensors; the attention is recomputed, never stored."""
    grad_out, query, bank, out = (t.contiguous() for t in (grad_out, query, bank, out))
    (n, dim), items = query.shape, bank.shape[0]
    inverse, grad_weight = _inverse_norms(bank)
    config = _config(dim, query.dtype)
    d_chunks = triton.cdiv(dim, config["BLOCK_DV"])
    grad_query = torch.empty_like(query)
    delta = torch.empty_like(lse)
    _query_grad_kernel[(triton.cdiv(n, config["BLOCK_N"]), d_chunks)](
        query, bank, inverse, out, grad_out, lse, query_norm, grad_query, delta, n, items, dim, 1.0 / temperature,
        NORM_EPS, **config)
    query_tiles, bank_tiles = triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(items, config["BLOCK_M"])
    splits = min(query_tiles, triton.cdiv(_TARGET_PROGRAMS, bank_tiles * d_chunks))
    tiles_per_split = triton.cdiv(query_tiles, splits)
    splits = triton.cdiv(query_tiles, tiles_per_split)
    partial = torch.empty((splits, items, dim), dtype=torch.float32, device=query.device)
    score_grad = torch.empty((splits, items), dtype=torch.float32, device=query.device)
    _bank_grad_kernel[(bank_tiles, d_chunks, splits)](
        query, bank, inverse, grad_out, lse, query_norm, delta, partial, score_grad, n, items, dim,
        1.0 / temperature, NORM_EPS, tiles_per_split, **config)
    grad_bank = partial.sum(0) - bank.float() * (score_grad.sum(0) * grad_weight)[:, None]
    return grad_query, grad_bank.to(bank.dtype)

