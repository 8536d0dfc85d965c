"""Triton dual_memory_margin: one fused search over both banks (k = 1), then the hinge.

Semantics are those of :func:`dmgrd.ops.dual_memory_margin.dual_memory_margin_reference`; the search is the
two-bank mode of :mod:`dmgrd.kernels.memory_nearest`.
"""

from __future__ import annotations

import torch
from dmgrd.kernels.memory_nearest import nearest_search_triton


def dual_memory_margin_triton(query: torch.Tensor, normal_bank: torch.Tensor, abnormal_bank: torch.Tensor,
                              margin: float, metric: str):
    """``(d_normal, d_abnormal, index_normal, index_abnormal, hinge)``, each ``[N]``, distances in the query's dtype."""
    (d_n, index_n), (d_a, index_a) = nearest_search_triton(query, [normal_bank, abnormal_bank], 1, metric)
    d_n, d_a = d_n[:, 0], d_a[:, 0]
    hinge = torch.relu(d_n - d_a + margin)
    dtype = query.dtype
    return d_n.to(dtype), d_a.to(dtype), index_n[:, 0], index_a[:, 0], hinge.to(dtype)
