"""Exact k-nearest memory items for each query (squared L2 or cosine distance), ties to the lowest index.

:func:`memory_nearest_reference` is the definition. The fast paths never build the ``N x M`` distance matrix:
the C++ CPU kernel runs BLAS tiles (``at::mm``) with the norm add and a running top-k fused over each tile, the
CUDA kernel shared-memory tiles with a per-query running top-k, the Triton kernel ``tl.dot`` tiles with a top-k
in registers; for few queries and items but a huge ``D`` (image-level search) they split ``D`` instead. Every
backend ranks like ``torch.sort(stable=True)``: equal distances by the lower index, NaN last.
"""

import torch

from dmgrd.numerics import NORM_EPS, accumulation_dtype
from dmgrd.ops._dispatch import BackendUnavailableError, Op, register_fake, requested_backend, triton_kernel

METRICS = ("l2", "cosine")
# The CUDA and Triton kernels keep the running top-k in registers; beyond this k they hand the call to the
# reference (or raise BackendUnavailableError when the backend was forced). The CPU kernel takes any k.
FAST_K_MAX = 16
_CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per chunk of queries in the reference


def inverse_norms(rows: torch.Tensor) -> torch.Tensor:
    """``1 / max(|row|, NORM_EPS)`` of every row of a 2-D tensor (as :func:`torch.nn.functional.normalize`)."""
    return 1 / torch.linalg.vector_norm(rows, dim=1).clamp_min(NORM_EPS)


def pairwise_distance_reference(query: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    """Full ``[N, M]`` distance matrix, accumulated in float32 (float64 for float64 inputs).

    ``"l2"``: ``max(|q|^2 + |m|^2 - 2 <q, m>, 0)``; ``"cosine"``: ``1 - <q, m> / (|q| |m|)`` with norms
    clamped at 1e-12 as :func:`torch.nn.functional.normalize` does. Both scale the raw products ``<q, m>``,
    so equal items give bit-equal distances whenever the products are exact (every backend computes them so).
    """
    acc = accumulation_dtype(query.dtype)
    q, m = query.to(acc), bank.to(acc)
    if metric == "cosine":
        return 1 - (q @ m.T) * inverse_norms(q)[:, None] * inverse_norms(m)
    return (q.square().sum(1, keepdim=True) + m.square().sum(1) - 2 * q @ m.T).clamp_min(0)


def memory_nearest_reference(query: torch.Tensor, bank: torch.Tensor, k: int = 1,
                             metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of :func:`memory_nearest` (no input checks); queries are done in chunks."""
    dists, indices = [], []
    rows = max(1, _CHUNK_ELEMENTS // max(bank.shape[0], 1))
    for start in range(0, query.shape[0], rows):
        d = pairwise_distance_reference(query[start:start + rows], bank, metric)
        d, i = torch.sort(d, dim=1, stable=True)
        dists.append(d[:, :k])
        indices.append(i[:, :k])
    return torch.cat(dists).to(query.dtype), torch.cat(indices)


def _beyond_fast_k(backend: str, query, bank, k, metric):
    """The reference for a ``k`` above :data:`FAST_K_MAX`, or an error when ``backend`` was forced."""
    if requested_backend() == backend:
        raise BackendUnavailableError(
            f"dmgrd.ops.memory_nearest: backend {backend!r} was forced but cannot run this call: k={k} is above "
            f"the {FAST_K_MAX} neighbours its GPU kernel keeps in registers")
    return memory_nearest_reference(query, bank, k, metric)


def _ext_memory_nearest(query, bank, k, metric):
    if query.is_cuda and k > FAST_K_MAX:
        return _beyond_fast_k("ext", query, bank, k, metric)
    return torch.ops.dmgrd.memory_nearest(query, bank, k, metric)


def _triton_memory_nearest(query, bank, k, metric):
    if k > FAST_K_MAX:
        return _beyond_fast_k("triton", query, bank, k, metric)
    return triton_kernel("memory_nearest", "memory_nearest_triton")(query, bank, k, metric)


# Triton first on CUDA: tl.dot tiles use tensor cores, the CUDA kernel is a plain shared-memory tiling.
OP = Op("memory_nearest", reference=memory_nearest_reference, ext=_ext_memory_nearest,
        triton=_triton_memory_nearest, cuda_order=("triton", "ext"))


def check_query_bank(query: torch.Tensor, bank: torch.Tensor, bank_name: str = "bank") -> None:
    """Raise ``ValueError`` unless ``query [N, D]`` and ``bank [M, D]`` (M >= 1) are compatible float tensors."""
    for name, t in (("query", query), (bank_name, bank)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [rows, D], got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if query.shape[1] != bank.shape[1]:
        raise ValueError(f"query and {bank_name} must have the same feature size D, got {query.shape[1]} and "
                         f"{bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError(f"{bank_name} has no memory items")
    if query.device != bank.device or query.dtype != bank.dtype:
        raise ValueError(f"query and {bank_name} must share device and dtype, got {query.device}/{query.dtype} "
                         f"and {bank.device}/{bank.dtype}")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def memory_nearest(query: torch.Tensor, bank: torch.Tensor, k: int = 1,
                   metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest memory items of every query, nearest first.

    Args:
        query: ``[N, D]`` queries (images flattened, or one row per pixel).
        bank: ``[M, D]`` memory items, same device and dtype.
        k: neighbours per query, ``1 <= k <= M``.
        metric: ``"l2"`` (squared Euclidean distance) or ``"cosine"`` (1 - cosine similarity).

    Returns:
        ``(dist [N, k], index [N, k])``: distances in the query's dtype (accumulated in float32) and int64
        item indices; equal distances are ordered by the lower index and NaN distances last, identically in
        every backend.

    The fast paths have no backward: this is a search, meant for ``torch.no_grad()``; inputs that require
    gradients run the (differentiable) reference. On CUDA, ``k > 16`` also runs the reference.
    """
    check_query_bank(query, bank)
    check_metric(metric)
    if not 1 <= int(k) <= bank.shape[0]:
        raise ValueError(f"k must be between 1 and the number of memory items ({bank.shape[0]}), got {k}")
    if query.shape[0] == 0:
        return query.new_empty((0, int(k))), torch.empty((0, int(k)), dtype=torch.long, device=query.device)
    return OP([query, bank], query, bank, int(k), metric)


@register_fake("memory_nearest")
def _memory_nearest_shapes(query, bank, k, metric):
    rows = query.shape[0]
    return query.new_empty((rows, k)), query.new_empty((rows, k), dtype=torch.long)
