"""cosine_kd_loss per backend, forward and forward + backward (the training step's KD loss), at the WRN50
(256x64², 512x32², 1024x16²) and efficientnet_lite0 (24x64², 40x32², 112x16²) pyramid sizes, batch 8."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops

PYRAMIDS = {
    "wrn50": [(256, 64, 64), (512, 32, 32), (1024, 16, 16)],
    "lite0": [(24, 64, 64), (40, 32, 32), (112, 16, 16)],
}
BATCH = 8


def _features(pyramid: str, device: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(BATCH, *shape, generator=gen).to(device, dtype) for shape in PYRAMIDS[pyramid]]
    student = [(t.float() + 0.1 * torch.randn(t.shape, generator=gen).to(device)).to(dtype).requires_grad_(True)
               for t in teacher]
    return teacher, student


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["flatten", "pixel"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("pyramid", list(PYRAMIDS))
@pytest.mark.parametrize("backend,device", backend_device_cases("cosine_kd_loss"))
def test_cosine_kd_loss(benchmark, backend, device, pyramid, backward, reduction, dtype):
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("CPU runs fp32 only")
    teacher, student = _features(pyramid, device, dtype)

    def step():
        loss = ops.cosine_kd_loss(teacher, student, reduction)
        return torch.autograd.grad(loss, student) if backward else loss

    passes = "forward+backward" if backward else "forward"
    benchmark.group = f"cosine_kd_loss {pyramid} {passes} {reduction} {device} B={BATCH} {dtype}"
    with ops.use_backend(backend):
        run = synchronized(step, device)
        run()
        rounds = 50 if device == "cuda" else 5
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    features = sum(t.numel() * t.element_size() for t in teacher)
    # forward reads T and S; backward reads them again and writes dL/dS
    record_throughput(benchmark, BATCH, features * (5 if backward else 2))
