"""memory_nearest per backend, at the two shapes the library uses (dual_memory_margin: bench_ops_dual_memory_margin.py).

- patch level: every pixel of one 64x64 feature map (N = 4096 queries, D = 256) against M = 16384 memory patches
  (dual: two banks of 8192), k = 1, float32;
- image level: a batch of 64 flattened feature maps (D = 256 * 64 * 64 = 2^20) against M = 30 memory images
  (dual: two banks of 30).

``cdist+topk`` (``torch.cdist`` then ``topk``) is what users would otherwise write; it is timed in the same run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops

SHAPES = {  # name: (queries, D, memory items, queries per image)
    "patch": (4096, 256, 16384, 4096),
    "image": (64, 256 * 64 * 64, 30, 1),
}


def inputs(shape: str, device: str, banks: int = 1):
    rows, depth, items, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(rows, depth, generator=gen).to(device)
    memory = [torch.randn(items // banks if shape == "patch" else items, depth, generator=gen).to(device)
              for _ in range(banks)]
    return query, memory


def timed(benchmark, fn, device: str, rounds: int) -> None:
    run = synchronized(fn, device)
    run()  # warm-up (and Triton compilation)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)


def record(benchmark, shape: str, query: torch.Tensor, memory: list[torch.Tensor]) -> None:
    rows, depth, _, per_image = SHAPES[shape]
    items = sum(m.shape[0] for m in memory)
    bytes_moved = (query.numel() + items * depth) * query.element_size()
    record_throughput(benchmark, rows // per_image, bytes_moved, flops=2 * rows * items * depth)


def rounds_for(backend: str, shape: str) -> int:
    return 3 if backend == "torch" and shape == "patch" else 5  # the reference sorts 67 M distances per call


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", backend_device_cases("memory_nearest"))
def test_memory_nearest(benchmark, backend, device, shape):
    query, (bank,) = inputs(shape, device)
    benchmark.group = f"memory_nearest {shape} {device}"
    with ops.use_backend(backend):
        timed(benchmark, lambda: ops.memory_nearest(query, bank, 1, "l2"), device, rounds_for(backend, shape))
    record(benchmark, shape, query, [bank])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_cdist_topk(benchmark, device, shape):
    query, (bank,) = inputs(shape, device)
    benchmark.group = f"memory_nearest {shape} {device}"
    timed(benchmark, lambda: torch.cdist(query, bank).topk(1, dim=1, largest=False), device, 5)
    record(benchmark, shape, query, [bank])
