"""Soft read-out of a memory bank: cosine attention of each query over the memory items."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmgrd.ops._dispatch import Op


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
    for name, t in (("query", query), ("bank", bank)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [rows, D], got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if query.shape[1] != bank.shape[1]:
        raise ValueError(f"query and bank must have the same feature size D, got {query.shape[1]} and {bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("bank has no memory items")
    if query.device != bank.device or query.dtype != bank.dtype:
        raise ValueError(
            f"query and bank must share device and dtype, got {query.device}/{query.dtype} and {bank.device}/{bank.dtype}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.shape[0] == 0:
        return query.new_empty((0, bank.shape[1]))
    return OP([query, bank], query, bank, float(temperature))
