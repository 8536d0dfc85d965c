"""image_score per backend on batches of 256² maps."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops


@pytest.mark.parametrize("mode", ["max", "topk_mean"])
@pytest.mark.parametrize("backend,device", backend_device_cases("image_score"))
def test_image_score(benchmark, backend, device, mode):
    batch = 64
    maps = torch.rand(batch, 1, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    benchmark.group = f"image_score {device} {mode}"
    with ops.use_backend(backend):
        run = synchronized(lambda: ops.image_score(maps, mode, 100), device)
        run()
        benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    record_throughput(benchmark, batch, maps.numel() * maps.element_size())
