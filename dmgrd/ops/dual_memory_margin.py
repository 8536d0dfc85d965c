"""Nearest item in a normal and an abnormal memory bank, and the margin hinge between the two distances."""

from __future__ import annotations

import torch

from dmgrd.ops._dispatch import Op
from dmgrd.ops.memory_nearest import check_metric, check_query_bank, memory_nearest_reference


def _distance_to(query: torch.Tensor, items: torch.Tensor, metric: str) -> torch.Tensor:
    """Differentiable distance of each query row to its own item row (same definition as the search)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, m = query.to(acc), items.to(acc)
    if metric == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(q, m, dim=1, eps=1e-12)
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


OP = Op("dual_memory_margin", reference=dual_memory_margin_reference)


def dual_memory_margin(query: torch.Tensor, normal_bank: torch.Tensor, abnormal_bank: torch.Tensor,
                       margin: float = 1.0, metric: str = "l2"):
    """Nearest normal and abnormal memory item of each query, and ``relu(d_normal - d_abnormal + margin)``.

    Args:
        query: ``[N, D]`` queries.
        normal_bank, abnormal_bank: ``[M_n, D]`` and ``[M_a, D]`` memory items, same device and dtype.
        margin: the hinge margin (>= 0).
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (1 - cosine similarity).

    Returns:
        ``(d_normal [N], d_abnormal [N], index_normal [N], index_abnormal [N], hinge [N])``; the distances
        and the hinge are differentiable with respect to ``query`` (the banks are constants).
    """
    check_query_bank(query, normal_bank, "normal_bank")
    check_query_bank(query, abnormal_bank, "abnormal_bank")
    check_metric(metric)
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if query.shape[0] == 0:
        empty, none = query.new_empty((0,)), torch.empty((0,), dtype=torch.long, device=query.device)
        return empty, empty, none, none, empty
    return OP([query], query, normal_bank, abnormal_bank, float(margin), metric)
