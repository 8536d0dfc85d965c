"""Greedy k-center coreset (PatchCore's subsampling) and its fused step: distance update and farthest point.

:func:`coreset_update` is one greedy step: the squared L2 distance of every point to the newly selected center
lowers each point's distance to the selection so far, and the farthest point becomes the next center.
:func:`greedy_coreset` repeats it; on the C++/CUDA/Triton backends each step is one pass over the points.
"""

import math

import torch
from tqdm.auto import tqdm

from dmgrd.numerics import accumulation_dtype
from dmgrd.ops._dispatch import Op, extension_op, register_fake, triton_kernel

_PROGRESS_WORK = 1 << 32  # points x features x steps above which greedy_coreset shows a progress bar


def coreset_update_reference(points: torch.Tensor, center: torch.Tensor,
                             min_dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of :func:`coreset_update` (no input checks)."""
    acc = min_dist.dtype
    dist = (points.to(acc) - center.to(acc)).square().sum(1)
    new_min = torch.minimum(min_dist, dist)
    return new_min, torch.argmax(new_min)


OP = Op("coreset_update", reference=coreset_update_reference, ext=extension_op("coreset_update"),
        triton=triton_kernel("coreset_update", "coreset_update_triton"))


def _check_points(points: torch.Tensor) -> None:
    if not isinstance(points, torch.Tensor) or points.dim() != 2:
        raise ValueError(f"points must be a 2-D tensor [N, D], got {getattr(points, 'shape', type(points).__name__)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be floating point, got {points.dtype}")
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"points must have at least one row and one feature, got shape {tuple(points.shape)}")


def coreset_update(points: torch.Tensor, center: torch.Tensor,
                   min_dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy k-center step: ``minimum(min_dist, |points - center|^2)`` and the index of its maximum.

    Args:
        points: ``[N, D]`` points, any float dtype and layout.
        center: ``[D]`` the newly selected center, same device and dtype as ``points``.
        min_dist: ``[N]`` squared distance of each point to the centers selected so far (``inf`` before the
            first), float32 (float64 for float64 points), on the points' device.

    Returns:
        ``(new_min_dist [N], farthest [])``: the updated distances (accumulated in ``min_dist``'s dtype) and the
        int64 index of the largest of them, the lowest index among equal ones. NaN propagates and counts as the
        largest value, as in :func:`torch.argmax`.
    """
    _check_points(points)
    if not isinstance(center, torch.Tensor) or center.shape != points.shape[1:]:
        raise ValueError(f"center must be a [D] = [{points.shape[1]}] tensor, got "
                         f"{getattr(center, 'shape', type(center).__name__)}")
    if center.dtype != points.dtype or center.device != points.device:
        raise ValueError(f"center must share the points' device and dtype ({points.device}/{points.dtype}), got "
                         f"{center.device}/{center.dtype}")
    acc = accumulation_dtype(points.dtype)
    if not isinstance(min_dist, torch.Tensor) or min_dist.shape != points.shape[:1]:
        raise ValueError(f"min_dist must be a [N] = [{points.shape[0]}] tensor, got "
                         f"{getattr(min_dist, 'shape', type(min_dist).__name__)}")
    if min_dist.dtype != acc or min_dist.device != points.device:
        raise ValueError(f"min_dist must be {acc} on {points.device} for {points.dtype} points, got "
                         f"{min_dist.dtype} on {min_dist.device}")
    return OP([points, center, min_dist], points, center, min_dist)


def random_projection(points: torch.Tensor, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Johnson-Lindenstrauss projection ``points @ R`` with ``R [D, dim]`` ~ N(0, 1/dim), drawn on the CPU from
    ``generator`` (so a seed gives the same matrix on every device); computed in the distance dtype."""
    acc = accumulation_dtype(points.dtype)
    matrix = torch.randn(points.shape[1], dim, generator=generator, dtype=acc) / math.sqrt(dim)
    return points.to(acc) @ matrix.to(points.device)


def nearest_to_mean(points: torch.Tensor) -> int:
    """Index of the point nearest the points' mean (the lowest on ties): a central first center for
    :func:`greedy_coreset`."""
    acc = points.to(accumulation_dtype(points.dtype))
    return int((acc - acc.mean(0)).square().sum(1).argmin())


def greedy_coreset(points: torch.Tensor, size: int, start: int = 0, projection_dim: int | None = None,
                   generator: torch.Generator | None = None, progress: bool | None = None) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore): ``size`` row indices, each the point farthest from those before.

    Args:
        points: ``[N, D]`` points (e.g. one row per memory patch), any float dtype.
        size: number of indices, ``1 <= size <= N``.
        start: the first center.
        projection_dim: if given, select in a ``projection_dim``-dimensional Johnson-Lindenstrauss random
            projection of the points (PatchCore uses 128), drawn from ``generator``.
        generator: the random generator of the projection.
        progress: show a tqdm bar; ``None`` shows one for large problems only.

    Returns:
        int64 ``[size]`` indices on the points' device, ``start`` first. They are distinct unless every point
        not yet selected coincides with a selected one (all distances 0), where the lowest index repeats.
        The covering radius of the result is at most twice the optimal one for ``size`` centers.
    """
    _check_points(points)
    count = points.shape[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= count:
        raise ValueError(f"size must be an int between 1 and the number of points ({count}), got {size!r}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < count:
        raise ValueError(f"start must be a point index in [0, {count}), got {start!r}")
    if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
                                       or projection_dim < 1):
        raise ValueError(f"projection_dim must be None or a positive int, got {projection_dim!r}")
    if projection_dim is not None:
        points = random_projection(points, projection_dim, generator)
    points = points.contiguous()
    if progress is None:
        progress = count * points.shape[1] * size >= _PROGRESS_WORK
    selected = torch.empty(size, dtype=torch.long, device=points.device)
    farthest = torch.tensor(start, device=points.device)
    min_dist = torch.full((count,), math.inf, dtype=accumulation_dtype(points.dtype), device=points.device)
    selected[0] = farthest
    # The next center stays a device tensor: no host synchronisation inside the loop.
    for step in tqdm(range(1, size), desc="greedy coreset", disable=not progress, dynamic_ncols=True):
        min_dist, farthest = coreset_update(points, points.index_select(0, farthest.view(1))[0], min_dist)
        selected[step] = farthest
    return selected


@register_fake("coreset_update")
def _coreset_update_shapes(points, center, min_dist):
    return torch.empty_like(min_dist), min_dist.new_empty((), dtype=torch.long)
