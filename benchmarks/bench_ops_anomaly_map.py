"""anomaly_map per backend at the WRN50 pyramid sizes (256x64², 512x32², 1024x16² -> 256²)."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops

LEVELS = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
OUT = (256, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [8, 64])
@pytest.mark.parametrize("backend,device", backend_device_cases("anomaly_map"))
def test_anomaly_map(benchmark, backend, device, batch, dtype):
    if device == "cpu" and (dtype != torch.float32 or (batch == 64 and backend == "torch")):
        pytest.skip("CPU runs fp32 and the B=64 reference only once per GPU-less session is too slow")
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(batch, *shape, generator=gen).to(device, dtype) for shape in LEVELS]
    student = [t + 0.1 * torch.randn(t.shape, generator=gen).to(device, dtype) for t in teacher]
    benchmark.group = f"anomaly_map {device} B={batch} {dtype}"
    with ops.use_backend(backend):
        run = synchronized(lambda: ops.anomaly_map(teacher, student, OUT), device)
        run()
        rounds = 20 if device == "cuda" else 3
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    read = sum(t.numel() * t.element_size() for t in teacher + student)
    record_throughput(benchmark, batch, read + batch * OUT[0] * OUT[1] * 4)
