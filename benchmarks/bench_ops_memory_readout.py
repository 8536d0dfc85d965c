"""memory_readout per backend at MemKD-like shapes: every pixel of a feature map reads out a memory bank.

Forward does 4 N M D flops (scores and read-out); forward + backward 14 N M D (backward recomputes the scores
and dP, then the query gradient and both bank terms).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops

# (images, H, W, D, M): N = images * H * W queries of D channels against M memory items
SHAPES = [(1, 64, 64, 256, 50), (1, 64, 64, 256, 512), (1, 32, 32, 512, 512), (4, 16, 16, 1024, 2000)]


def _inputs(images, height, width, dim, items, device, dtype, backward):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(images * height * width, dim, generator=gen).to(device, dtype)
    bank = torch.randn(items, dim, generator=gen).to(device, dtype)
    return query.requires_grad_(backward), bank.requires_grad_(backward)


def _step(query, bank, backward):
    out = ops.memory_readout(query, bank, 0.1)
    if backward:
        out.backward(torch.ones_like(out))
        query.grad = bank.grad = None
    return out


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("images,height,width,dim,items", SHAPES,
                         ids=[f"N{b * h * w}-D{d}-M{m}" for b, h, w, d, m in SHAPES])
@pytest.mark.parametrize("backend,device", backend_device_cases("memory_readout"))
def test_memory_readout(benchmark, backend, device, images, height, width, dim, items, dtype, backward):
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("CPU runs fp32 only")
    query, bank = _inputs(images, height, width, dim, items, device, dtype, backward)
    n = query.shape[0]
    benchmark.group = f"memory_readout {device} {dtype} N={n} D={dim} M={items} {'fwd+bwd' if backward else 'fwd'}"
    with ops.use_backend(backend):
        run = synchronized(lambda: _step(query, bank, backward), device)
        run()
        rounds = 20 if device == "cuda" else 3
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    size = query.element_size()
    moved = (2 * n * dim + items * dim) * size + 8 * n  # read queries and bank, write the read-out, lse, norms
    if backward:
        moved += (4 * n * dim + 2 * items * dim) * size  # read dO, queries, output, bank; write both gradients
    record_throughput(benchmark, images, moved, flops=(14 if backward else 4) * n * items * dim)
