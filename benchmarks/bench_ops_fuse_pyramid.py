"""fuse_pyramid per backend at MSFF's real shapes (256² images, batch 8), alone, and MSFF's whole parameter-free
attention: channel_pool of the three inputs MI_l (2 C_l channels) plus fuse_pyramid of the three fused features
(C_l channels), forward and forward + backward. channel_pool alone: bench_ops_channel_pool.py."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device_cases, record_throughput, synchronized

from dmgrd import ops

BATCH = 8
# Teacher channels C_l at strides 4, 8, 16 (64², 32², 16² for 256² images).
TEACHERS = {"wide_resnet50_2": (256, 512, 1024), "efficientnet_lite0": (24, 40, 112)}
SIZES = (64, 32, 16)


def make_inputs(teacher: str, device: str, requires_grad: bool):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(requires_grad)

    channels = TEACHERS[teacher]
    inputs = [rand(BATCH, 2 * c, s, s) for c, s in zip(channels, SIZES, strict=True)]
    features = [rand(BATCH, c, s, s) for c, s in zip(channels, SIZES, strict=True)]
    logits = [rand(BATCH, 1, s, s) for s in SIZES]
    return inputs, features, logits


def attention(inputs, features, logits):
    """The op work of one MSFF forward (the 7x7 convolution between the two stages is left out)."""
    return [ops.channel_pool(x) for x in inputs] + ops.fuse_pyramid(features, logits)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def timed_run(benchmark, backend, device, fn, bytes_moved, group):
    benchmark.group = group
    with ops.use_backend(backend):
        run = synchronized(fn, device)
        run()
        benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    record_throughput(benchmark, BATCH, bytes_moved)


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("backend,device", backend_device_cases("fuse_pyramid"))
def test_attention_forward(benchmark, backend, device, teacher):
    inputs, features, logits = make_inputs(teacher, device, requires_grad=False)
    # Read each input and feature once, write each output once.
    timed_run(benchmark, backend, device, lambda: attention(inputs, features, logits),
         nbytes(inputs) + 2 * nbytes(features), f"msff attention forward {device} {teacher}")


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("backend,device", backend_device_cases("fuse_pyramid"))
def test_attention_forward_backward(benchmark, backend, device, teacher):
    inputs, features, logits = make_inputs(teacher, device, requires_grad=True)
    leaves = inputs + features + logits

    def step():
        outputs = attention(inputs, features, logits)
        return torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs])

    # Forward, then the backward: read the inputs again and write their gradients; read the features and
    # the outputs' gradients, write the features' gradients.
    timed_run(benchmark, backend, device, step, 3 * nbytes(inputs) + 5 * nbytes(features),
         f"msff attention forward+backward {device} {teacher}")


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("backend,device", backend_device_cases("fuse_pyramid"))
def test_fuse_pyramid(benchmark, backend, device, teacher):
    _, features, logits = make_inputs(teacher, device, requires_grad=False)
    timed_run(benchmark, backend, device, lambda: ops.fuse_pyramid(features, logits), 2 * nbytes(features),
         f"fuse_pyramid {device} {teacher}")
