"""coreset_update and greedy_coreset per backend on the patches of 30 WRN50 memory images (level 1: 30 x 64²)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops

ROWS, DIM = 30 * 64 * 64, 256  # 122880 patches of 256 channels
IMAGES = 30


def _points(device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0)).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend,device", backend_device_cases("coreset_update"))
def test_coreset_update(benchmark, backend, device, dtype):
    points = _points(device, dtype)
    center = points[17]
    min_dist = torch.full((ROWS,), math.inf, device=device)
    benchmark.group = f"coreset_update {device} {ROWS}x{DIM} {dtype}"
    with ops.use_backend(backend):
        run = synchronized(lambda: ops.coreset_update(points, center, min_dist), device)
        run()
        benchmark.pedantic(run, rounds=50 if device == "cuda" else 5, iterations=1, warmup_rounds=1)
    bytes_moved = points.numel() * points.element_size() + 2 * ROWS * min_dist.element_size()
    record_throughput(benchmark, IMAGES, bytes_moved, flops=3 * ROWS * DIM)


@pytest.mark.parametrize("projection_dim", [None, 128], ids=["full", "jl128"])
@pytest.mark.parametrize("backend,device", backend_device_cases("coreset_update"))
def test_greedy_coreset(benchmark, backend, device, projection_dim):
    steps = 1000 if device == "cuda" else 20
    points = _points(device, torch.float32)
    benchmark.group = f"greedy_coreset {device} {ROWS}x{DIM} {steps} centers"
    with ops.use_backend(backend):
        run = synchronized(lambda: ops.greedy_coreset(points, steps, projection_dim=projection_dim,
                                                      generator=torch.Generator().manual_seed(0)), device)
        run()
        benchmark.pedantic(run, rounds=5 if device == "cuda" else 2, iterations=1, warmup_rounds=0)
    dim = projection_dim or DIM
    record_throughput(benchmark, IMAGES, (steps - 1) * ROWS * (4 * dim + 8), flops=3 * (steps - 1) * ROWS * dim)
    benchmark.extra_info["centers_per_s"] = round(steps / benchmark.stats.stats.median, 1)
