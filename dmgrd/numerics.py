"""Numerical definitions shared by the torch references and the fast kernels (``csrc/common.h`` mirrors them
for C++ and CUDA): norm clamps, accumulation dtypes, Gaussian taps."""

import functools
from collections.abc import Iterable

import torch

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's clamp of each norm
NORM_EPS = 1e-12  # torch.nn.functional.normalize's clamp of the norm


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype every reduction of the ops runs in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def level_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ of per-level terms, added in level order (the losses' and references' sum over pyramid levels)."""
    return functools.reduce(torch.add, terms)


def gaussian_weights(sigma: float, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian taps scipy's ``gaussian_filter`` uses (truncate 4): ``2r+1`` values."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)
