"""Triton exact k-nearest search in one or two memory banks (memory_nearest, dual_memory_margin).

Semantics are those of :func:`dmgrd.ops.memory_nearest.memory_nearest_reference`. The two banks of a dual search
are one virtual item range (``[0, M1)`` the first bank, ``[M1, M1 + M2)`` the second), so a tile of items can
straddle both and every query row is read once per tile for both banks.

- Fused search (``_search_kernel``): a program takes ``BLOCK_N`` queries and a range of item tiles; ``tl.dot``
  gives each ``BLOCK_N x BLOCK_M`` tile of inner products (float32 accumulation; IEEE products for float32
  inputs, like the reference's matmul), the row terms turn them into distances, and a running top-k in
  registers absorbs the tile. A candidate is one int64 key, ``order(distance) << 32 | index``, so that a
  single integer comparison ranks smaller distances first, equal distances by the lower index and NaN last.
  With few query blocks the item range is split over programs; their key lists are merged by a sort here.
- Split-D (``_partial_dots_kernel``): few queries and items but a huge ``D`` (image-level search). Programs
  split the columns and write partial products and squared norms; their sum is a small ``N x M`` matrix,
  ranked with a stable sort.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dmgrd._extension import triton_interpreted
from dmgrd.numerics import NORM_EPS

METRIC_CODES = {"l2": 0, "cosine": 1}
EPS: tl.constexpr = tl.constexpr(NORM_EPS)
KEY_MAX: tl.constexpr = tl.constexpr(2**63 - 1)  # empty top-k slots hold KEY_MAX - slot
MAX_ITEMS = 2**31 - 1  # an item index is an int32 in the low half of a key


@functools.cache
def _config(device_index: int | None) -> dict:
    """Block sizes and the parallelism to aim for (tiny under the interpreter, so tests reach every path)."""
    if device_index is None:  # the interpreter: small tiles, splits and split-D already on tiny inputs
        return {"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 32, "programs": 2, "wide_depth": 64, "num_warps": 1}
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32, "programs": 4 * sms, "wide_depth": 4096, "num_warps": 4}


@triton.jit
def _row_term(squares, METRIC: tl.constexpr):
    """Per-row distance term: the sum of squares (l2) or 1 / max(norm, eps) (cosine)."""
    if METRIC == 0:
        return squares
    norm = tl.sqrt_rn(squares)
    return tl.math.div_rn(tl.full(norm.shape, 1.0, tl.float32), tl.where(norm < EPS, EPS, norm))


@triton.jit
def _row_terms_kernel(x_ptr, out_ptr, R, D, s_r, s_d, METRIC: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    squares = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < R) & (cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_r + cols[None, :] * s_d, mask=mask, other=0.0)
        x = x.to(tl.float32)
        squares += tl.sum(x * x, 1)
    tl.store(out_ptr + rows, _row_term(squares, METRIC), mask=rows < R)


@triton.jit
def _load_queries(q_ptr, s_qn, s_qd, rows, N, ds, D):
    """Queries ``rows`` x columns ``ds`` (zero outside)."""
    mask = (rows[:, None] < N) & (ds[None, :] < D)
    return tl.load(q_ptr + rows[:, None].to(tl.int64) * s_qn + ds[None, :] * s_qd, mask=mask, other=0.0)


@triton.jit
def _load_items_t(b1_ptr, s1m, s1d, M1, b2_ptr, s2m, s2d, M2, cols, ds, D, DUAL: tl.constexpr):
    """Items ``cols`` of the virtual range (bank 1, then bank 2) x columns ``ds``, transposed: [BLOCK_D, BLOCK_M]."""
    in_d = ds[:, None] < D
    items = tl.load(b1_ptr + cols[None, :].to(tl.int64) * s1m + ds[:, None] * s1d,
                    mask=in_d & (cols[None, :] < M1), other=0.0)
    if DUAL:
        second = cols[None, :] - M1
        items += tl.load(b2_ptr + second.to(tl.int64) * s2m + ds[:, None] * s2d,
                         mask=in_d & (second >= 0) & (second < M2), other=0.0)
    return items


@triton.jit
def _distance(dots, q_term, m_term, METRIC: tl.constexpr):
    if METRIC == 0:
        d = q_term[:, None] + m_term[None, :] - 2.0 * dots
        return tl.where(d < 0.0, 0.0, d)
    return 1.0 - dots * q_term[:, None] * m_term[None, :]


@triton.jit
def _pack(d, index):
    """int64 keys ordered as (distance, index) with NaN after every number (and -0.0 equal to +0.0)."""
    bits = tl.where(d == 0.0, 0.0, d).to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(d != d, 0x7FFFFFFF, key)
    return (key.to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def _absorb(top, keys, valid):
    """Running top-k ``top`` [BLOCK_N, KP] (unsorted, slots ``valid``) updated with a tile's ``keys``."""
    best = tl.min(keys, 1)
    worst = tl.max(tl.where(valid, top, -KEY_MAX - 1), 1)
    # Each round moves every row's best remaining candidate into its worst slot if it ranks before it; a row
    # takes at most k candidates per tile, and in most tiles none.
    while tl.max((best < worst).to(tl.int32), 0) > 0:
        take = (best < worst)[:, None]
        top = tl.where(take & (top == worst[:, None]), best[:, None], top)
        keys = tl.where(take & (keys == best[:, None]), KEY_MAX, keys)
        best = tl.min(keys, 1)
        worst = tl.max(tl.where(valid, top, -KEY_MAX - 1), 1)
    return top


@triton.jit
def _search_kernel(q_ptr, s_qn, s_qd, q_terms_ptr, N, D,
                   b1_ptr, s1m, s1d, M1, b2_ptr, s2m, s2d, M2, item_terms_ptr, tiles_per_split,
                   out_ptr, METRIC: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Top-k keys of queries block ``program_id(0)`` among item tiles of split ``program_id(1)``.

    Writes ``out[split, bank, row, :K]`` (int64 keys, unsorted; empty slots hold sentinels near KEY_MAX).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    q_terms = tl.load(q_terms_ptr + rows, mask=rows < N, other=0.0)
    slot = tl.arange(0, KP)[None, :]
    valid = slot < K
    empty = tl.zeros([BLOCK_N, KP], tl.int64) + (KEY_MAX - slot.to(tl.int64))  # distinct sentinels
    top1 = empty
    top2 = empty
    items = M1 + M2
    begin = split * tiles_per_split * BLOCK_M
    end = tl.minimum(begin + tiles_per_split * BLOCK_M, items)
    for m0 in range(begin, end, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        dots = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            q = _load_queries(q_ptr, s_qn, s_qd, rows, N, ds, D)
            m = _load_items_t(b1_ptr, s1m, s1d, M1, b2_ptr, s2m, s2d, M2, cols, ds, D, NB == 2)
            dots = tl.dot(q, m, dots, input_precision=PRECISION)
        m_terms = tl.load(item_terms_ptr + cols, mask=cols < items, other=0.0)
        d = _distance(dots, q_terms, m_terms, METRIC)
        top1 = _absorb(top1, tl.where(cols[None, :] < M1, _pack(d, cols[None, :]), KEY_MAX), valid)
        if NB == 2:
            second = cols[None, :] - M1
            top2 = _absorb(top2, tl.where((second >= 0) & (second < M2), _pack(d, second), KEY_MAX), valid)
    out_rows = (split * NB * N + rows[:, None]).to(tl.int64) * K + slot
    mask = (rows[:, None] < N) & valid
    tl.store(out_ptr + out_rows, top1, mask=mask)
    if NB == 2:
        tl.store(out_ptr + out_rows + N * K, top2, mask=mask)


@triton.jit
def _partial_dots_kernel(q_ptr, s_qn, s_qd, N, D, b1_ptr, s1m, s1d, M1, b2_ptr, s2m, s2d, M2, depth_per_split,
                         dots_ptr, q_sq_ptr, item_sq_ptr, DUAL: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Products and squared norms over the columns of split ``program_id(2)``: dots[split, N, M1 + M2],
    q_sq[split, N] (written by the first item block), item_sq[split, M1 + M2] (by the first query block)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    items = M1 + M2
    begin = split * depth_per_split
    end = tl.minimum(begin + depth_per_split, D)
    dots = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    q_sq = tl.zeros([BLOCK_N], tl.float32)
    item_sq = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(begin, end, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        q = _load_queries(q_ptr, s_qn, s_qd, rows, N, ds, end)
        m = _load_items_t(b1_ptr, s1m, s1d, M1, b2_ptr, s2m, s2d, M2, cols, ds, end, DUAL)
        dots = tl.dot(q, m, dots, input_precision=PRECISION)
        q32 = q.to(tl.float32)
        m32 = m.to(tl.float32)
        q_sq += tl.sum(q32 * q32, 1)
        item_sq += tl.sum(m32 * m32, 0)
    in_rows = rows < N
    in_cols = cols < items
    out = (split * N + rows[:, None]).to(tl.int64) * items + cols[None, :]
    tl.store(dots_ptr + out, dots, mask=in_rows[:, None] & in_cols[None, :])
    if tl.program_id(1) == 0:
        tl.store(q_sq_ptr + split * N + rows, q_sq, mask=in_rows)
    if tl.program_id(0) == 0:
        tl.store(item_sq_ptr + split * items + cols, item_sq, mask=in_cols)


def _terms(squares: torch.Tensor, metric: str) -> torch.Tensor:
    return squares if metric == "l2" else 1.0 / squares.sqrt().clamp_min(NORM_EPS)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 distance, int64 index) of packed keys."""
    high = (keys >> 32).to(torch.int32)
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


class _Problem:
    """Query, one or two banks and their launch arguments."""

    def __init__(self, query: torch.Tensor, banks: list[torch.Tensor], metric: str):
        self.query, self.banks, self.metric = query, banks, metric
        self.n, self.depth = query.shape
        self.sizes = [b.shape[0] for b in banks]
        self.items = sum(self.sizes)
        self.dual = len(banks) == 2
        self.cfg = _config(None if triton_interpreted() else (query.device.index or 0))
        self.precision = "ieee" if query.dtype == torch.float32 else "tf32"
        if self.items > MAX_ITEMS:
            raise ValueError(f"the Triton search takes at most {MAX_ITEMS} memory items, got {self.items}")

    def bank_args(self) -> list:
        second = self.banks[-1]
        first = self.banks[0]
        return [first, *first.stride(), self.sizes[0], second, *second.stride(), self.sizes[1] if self.dual else 0]

    def row_terms(self, x: torch.Tensor, out: torch.Tensor) -> None:
        block_r, block_d = self.cfg["BLOCK_N"], self.cfg["BLOCK_D"]
        _row_terms_kernel[(triton.cdiv(x.shape[0], block_r),)](
            x, out, x.shape[0], self.depth, *x.stride(), METRIC=METRIC_CODES[self.metric], BLOCK_R=block_r,
            BLOCK_D=block_d)

    def topk(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per bank: (float32 dist [N, k], int64 index [N, k]), nearest first."""
        cfg = self.cfg
        blocks = triton.cdiv(self.n, cfg["BLOCK_N"])
        tiles = triton.cdiv(self.items, cfg["BLOCK_M"])
        if blocks * tiles < cfg["programs"] and self.depth >= cfg["wide_depth"]:
            return self._split_depth(k, blocks, tiles)
        splits = min(tiles, max(1, triton.cdiv(cfg["programs"], blocks)))
        tiles_per_split = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, tiles_per_split)
        return self._fused(k, blocks, splits, tiles_per_split)

    def _fused(self, k, blocks, splits, tiles_per_split):
        cfg, device = self.cfg, self.query.device
        q_terms = torch.empty(self.n, dtype=torch.float32, device=device)
        item_terms = torch.empty(self.items, dtype=torch.float32, device=device)
        self.row_terms(self.query, q_terms)
        start = 0
        for bank, size in zip(self.banks, self.sizes, strict=True):
            self.row_terms(bank, item_terms[start:start + size])
            start += size
        nb = len(self.banks)
        keys = torch.empty((splits, nb, self.n, k), dtype=torch.int64, device=device)
        _search_kernel[(blocks, splits)](
            self.query, *self.query.stride(), q_terms, self.n, self.depth, *self.bank_args(), item_terms,
            tiles_per_split, keys, METRIC=METRIC_CODES[self.metric], K=k, KP=triton.next_power_of_2(k),
            NB=nb, PRECISION=self.precision, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"],
            BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
        merged = keys.permute(1, 2, 0, 3).reshape(nb, self.n, splits * k).sort(dim=2).values[..., :k]
        return [_decode(merged[b]) for b in range(nb)]

    def _split_depth(self, k, blocks, tiles):
        cfg, device = self.cfg, self.query.device
        splits = max(1, min(triton.cdiv(cfg["programs"], blocks * tiles), triton.cdiv(self.depth, cfg["BLOCK_D"])))
        depth_per_split = triton.cdiv(triton.cdiv(self.depth, splits), cfg["BLOCK_D"]) * cfg["BLOCK_D"]
        splits = triton.cdiv(self.depth, depth_per_split)
        dots = torch.empty((splits, self.n, self.items), dtype=torch.float32, device=device)
        q_sq = torch.empty((splits, self.n), dtype=torch.float32, device=device)
        item_sq = torch.empty((splits, self.items), dtype=torch.float32, device=device)
        _partial_dots_kernel[(blocks, tiles, splits)](
            self.query, *self.query.stride(), self.n, self.depth, *self.bank_args(), depth_per_split, dots, q_sq,
            item_sq, DUAL=self.dual, PRECISION=self.precision, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"],
            BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
        dots, q_terms, item_terms = dots.sum(0), _terms(q_sq.sum(0), self.metric), _terms(item_sq.sum(0), self.metric)
        if self.metric == "l2":
            dist = (q_terms[:, None] + item_terms - 2 * dots).clamp_min(0)
        else:
            dist = 1 - dots * q_terms[:, None] * item_terms
        out = []
        for bank_dist in dist.split(self.sizes, dim=1):
            d, i = torch.sort(bank_dist, dim=1, stable=True)
            out.append((d[:, :k], i[:, :k]))
        return out


def nearest_search_triton(query: torch.Tensor, banks: list[torch.Tensor], k: int,
                          metric: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``k`` nearest items of each query row in each of one or two ``banks``: per bank (float32 dist [N, k],
    int64 index [N, k]). Any strides; ``k`` up to 16 (the top-k lives in registers)."""
    return _Problem(query, banks, metric).topk(k)


def memory_nearest_triton(query: torch.Tensor, bank: torch.Tensor, k: int,
                          metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dist [N, k] in the query's dtype, index [N, k])`` of :func:`dmgrd.ops.memory_nearest`."""
    ((dist, index),) = nearest_search_triton(query, [bank], k, metric)
    return dist.to(query.dtype), index
