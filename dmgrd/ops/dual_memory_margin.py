"""Nearest item in a normal and an abnormal memory bank, and the margin hinge between the two distances.

The fast paths search both banks in one pass (the C++/CUDA/Triton searches of :mod:`dmgrd.ops.memory_nearest`
with two banks and k = 1) and share one autograd function whose backward applies the distance gradients
(l2: ``2 (q - m)``; cosine: ``(cos q / |q| - m / |m|) / |q|``) at the gathered nearest items.
"""

import torch
from torch.autograd.function import once_differentiable

from dmgrd.numerics import NORM_EPS, accumulation_dtype
from dmgrd.ops._dispatch import Op, extension_op, register_fake, triton_kernel
from dmgrd.ops.memory_nearest import (
    check_metric,
    check_query_bank,
    inverse_norms,
    memory_nearest_reference,
)


def _distance_to(query: torch.Tensor, items: torch.Tensor, metric: str) -> torch.Tensor:
    """Differentiable distance of each query row to its own item row (same definition as the search)."""
    acc = accumulation_dtype(query.dtype)
    q, m = query.to(acc), items.to(acc)
    if metric == "cosine":
        return 1 - (q * m).sum(1) * inverse_norms(q) * inverse_norms(m)
    return (q.square().sum(1) + m.square().sum(1) - 2 * (q * m).sum(1)).clamp_min(0)


def dual_memory_margin_reference(query: torch.Tensor, normal_bank: torch.Tensor, abnormal_bank: torch.Tensor,
                                 margin: float, metric: str = "l2"):
    """Pure-torch definition of :func:`dual_memory_margin` (no input checks)."""
    with torch.no_grad():
        _, index_n = memory_nearest_reference(query, normal_bank, 1, metric)
        _, index_a = memory_nearest_reference(query, abnormal_bank, 1, metric)
    index_n, index_a = index_n[:, 0], index_a[:, 0]
    d_n = _distance_to(query, normal_bank[index_n], metric)
    d_a = _distance_to(query, abnormal_bank[index_a], metric)
    hinge = torch.relu(d_n - d_a + margin)
    return d_n.to(query.dtype), d_a.to(query.dtype), index_n, index_a, hinge.to(query.dtype)


def _distance_grad(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise gradient of ``distance(x, y)`` with respect to ``x`` (rows of ``x`` and ``y`` paired)."""
    if metric == "l2":
        return 2 * (x - y)
    nx = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    ny = y.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    cos = (x * y).sum(1, keepdim=True) / (nx * ny)
    return (cos * x / nx - y / ny) / nx


class _DualMemoryMargin(torch.autograd.Function):
    """A fast search forward (``search`` = the ext or Triton kernel); backward at the gathered nearest items."""

    @staticmethod
    def forward(ctx, search, query, normal_bank, abnormal_bank, margin, metric):
        d_n, d_a, index_n, index_a, hinge = search(query, normal_bank, abnormal_bank, margin, metric)
        ctx.save_for_backward(query, normal_bank, abnormal_bank, index_n, index_a, hinge)
        ctx.metric = metric
        ctx.mark_non_differentiable(index_n, index_a)
        return d_n, d_a, index_n, index_a, hinge

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_n, grad_a, _grad_index_n, _grad_index_a, grad_hinge):
        query, normal_bank, abnormal_bank, index_n, index_a, hinge = ctx.saved_tensors
        acc = accumulation_dtype(query.dtype)
        q = query.to(acc)
        active = (hinge > 0).to(acc) * grad_hinge.to(acc)  # relu passes the gradient where the hinge is > 0
        banks, indices = (normal_bank, abnormal_bank), (index_n, index_a)
        items = [bank[index].to(acc) for bank, index in zip(banks, indices, strict=True)]
        coefs = [(grad_n.to(acc) + active)[:, None], (grad_a.to(acc) - active)[:, None]]
        grad_query = None
        if ctx.needs_input_grad[1]:
            terms = (c * _distance_grad(q, m, ctx.metric) for c, m in zip(coefs, items, strict=True))
            grad_query = sum(terms).to(query.dtype)
        grad_banks = [
            torch.zeros_like(bank, dtype=acc).index_add_(0, index, c * _distance_grad(m, q, ctx.metric)).to(bank.dtype)
            if ctx.needs_input_grad[2 + i] else None
            for i, (bank, index, c, m) in enumerate(zip(banks, indices, coefs, items, strict=True))
        ]
        return None, grad_query, *grad_banks, None, None


def _through(search):
    """The op run by ``search`` (one backend's two-bank nearest search) inside the shared autograd function."""
    return lambda *args: _DualMemoryMargin.apply(search, *args)


# Triton first on CUDA: tl.dot tiles use tensor cores, the CUDA kernel is a plain shared-memory tiling.
OP = Op("dual_memory_margin", reference=dual_memory_margin_reference,
        ext=_through(extension_op("dual_memory_margin")),
        triton=_through(triton_kernel("dual_memory_margin", "dual_memory_margin_triton")),
        cuda_order=("triton", "ext"), differentiable=True)


def dual_memory_margin(query: torch.Tensor, normal_bank: torch.Tensor, abnormal_bank: torch.Tensor,
                       margin: float = 1.0, metric: str = "l2"):
    """Nearest normal and abnormal memory item of each query, and ``relu(d_normal - d_abnormal + margin)``.

    Args:
        query: ``[N, D]`` queries.
        normal_bank, abnormal_bank: ``[M_n, D]`` and ``[M_a, D]`` memory items, same device and dtype.
        margin: the hinge margin (>= 0).
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (1 - cosine similarity).

    Returns:
        ``(d_normal [N], d_abnormal [N], index_normal [N], index_abnormal [N], hinge [N])``: distances and
        hinge in the query's dtype (accumulated in float32), int64 indices (ties to the lower index). The
        distances and the hinge are differentiable with respect to ``query`` (and to the banks, through the
        selected items), in every backend.
    """
    check_query_bank(query, normal_bank, "normal_bank")
    check_query_bank(query, abnormal_bank, "abnormal_bank")
    check_metric(metric)
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if query.shape[0] == 0:
        empty, none = query.new_empty((0,)), torch.empty((0,), dtype=torch.long, device=query.device)
        return empty, empty, none, none, empty
    return OP([query, normal_bank, abnormal_bank], query, normal_bank, abnormal_bank, float(margin), metric)


@register_fake("dual_memory_margin")
def _dual_memory_margin_shapes(query, normal_bank, abnormal_bank, margin, metric):
    rows = query.shape[0]
    index = query.new_empty((rows,), dtype=torch.long)
    return (query.new_empty((rows,)), query.new_empty((rows,)), index, torch.empty_like(index),
            query.new_empty((rows,)))
