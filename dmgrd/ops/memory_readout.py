"""Soft read-out of a memory bank: cosine attention of each query over the memory items."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmgrd.ops._dispatch import Op
from dmgrd.ops.memory_nearest import check_query_bank


def memory_readout_reference(query: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pure-torch definition of :func:`memory_readout` (differentiable, no input checks)."""
    scores = F.normalize(query.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    weights = torch.softmax(scores / temperature, dim=1)
    return (weights @ bank.float()).to(query.dtype)


OP = Op("memory_readout", reference=memory_readout_reference)


def memory_readout(query: torch.Tensor, bank: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``softmax(cos(query, bank) / temperature, dim=1) @ bank``: each query's attention-weighted memory.

    Args:
        query: ``[N, D]`` queries (one per pixel or per image).
        bank: ``[M, D]`` memory items, same device and dtype as ``query``.
        temperature: softmax temperature, > 0; small values approach the nearest item.

    Returns:
        ``[N, D]`` read-out in the query's dtype, differentiable with respect to ``query`` and ``bank``.
    """
    check_query_bank(query, bank)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.shape[0] == 0:
        return query.new_empty((0, bank.shape[1]))
    return OP([query, bank], query, bank, float(temperature))
