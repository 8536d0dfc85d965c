"""Soft read-out of a memory bank: cosine attention of each query over the memory items.

The fast paths (C++/CUDA extension, Triton) work like flash attention: tiles of queries meet tiles of
memory items, the softmax is computed online (running maximum and sum) and the ``[N, M]`` attention matrix
never exists. Scores use the raw inputs, ``s_ij = <q_i, m_j> / (|q_i| |m_j| T)`` (norms clamped at
``NORM_EPS`` as :func:`torch.nn.functional.normalize` does). The forward pass keeps each query's
logsumexp and norm; backward recomputes the attention from them (flash-attention 2) and returns the
gradients for the queries and for the bank, which enters both as keys (normalised) and as values (raw).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dmgrd.numerics import NORM_EPS, accumulation_dtype
from dmgrd.ops._dispatch import Op, register_fake
from dmgrd.ops.memory_nearest import check_query_bank


def memory_readout_reference(query: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pure-torch definition of :func:`memory_readout` (differentiable, no input checks), accumulated in
    float32 (float64 for float64 inputs)."""
    acc = accumulation_dtype(query.dtype)
    scores = F.normalize(query.to(acc), dim=1, eps=NORM_EPS) @ F.normalize(bank.to(acc), dim=1, eps=NORM_EPS).T
    weights = torch.softmax(scores / temperature, dim=1)
    return (weights @ bank.to(acc)).to(query.dtype)


class Kernels(NamedTuple):
    """A backend's two kernels.

    ``forward(query, bank, temperature) -> (out, lse, query_norm)`` and
    ``backward(grad_out, query, bank, out, lse, query_norm, temperature) -> (grad_query, grad_bank)``;
    ``lse`` and ``query_norm`` are per-query rows in the accumulation dtype.
    """

    forward: Callable
    backward: Callable


class _MemoryReadout(torch.autograd.Function):
    """Autograd of a fast backend: its forward kernel, and its backward kernel recomputing from the lse."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, bank: torch.Tensor, temperature: float, kernels: Kernels):
        out, lse, query_norm = kernels.forward(query, bank, temperature)
        ctx.save_for_backward(query, bank, out, lse, query_norm)
        ctx.temperature, ctx.kernels = temperature, kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_query, grad_bank = ctx.kernels.backward(grad_out, *ctx.saved_tensors, ctx.temperature)
        return grad_query, grad_bank, None, None


def _ext_forward(query, bank, temperature):
    return torch.ops.dmgrd.memory_readout(query, bank, temperature)


def _ext_backward(grad_out, query, bank, out, lse, query_norm, temperature):
    return torch.ops.dmgrd.memory_readout_backward(grad_out, query, bank, out, lse, query_norm, temperature)


EXT_KERNELS = Kernels(_ext_forward, _ext_backward)


def _ext_memory_readout(query, bank, temperature):
    return _MemoryReadout.apply(query, bank, temperature, EXT_KERNELS)


def _triton_memory_readout(query, bank, temperature):
    from dmgrd.kernels.memory_readout import memory_readout_backward, memory_readout_forward

    return _MemoryReadout.apply(query, bank, temperature, Kernels(memory_readout_forward, memory_readout_backward))


OP = Op(
    "memory_readout",
    reference=memory_readout_reference,
    ext=_ext_memory_readout,
    triton=_triton_memory_readout,
    differentiable=True,
)


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
    if query.numel() == 0:  # no queries or no features: nothing for a kernel to do
        return memory_readout_reference(query, bank, float(temperature))
    return OP([query, bank], query, bank, float(temperature))


@register_fake("memory_readout")
def _memory_readout_shapes(query, bank, temperature):
    rows = query.new_empty((query.shape[0],), dtype=accumulation_dtype(query.dtype))
    return query.new_empty(query.shape), rows, torch.empty_like(rows)


@register_fake("memory_readout_backward")
def _memory_readout_backward_shapes(grad_out, query, bank, out, lse, query_norm, temperature):
    return query.new_empty(query.shape), bank.new_empty(bank.shape)
