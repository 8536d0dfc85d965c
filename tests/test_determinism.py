"""Every C++ CPU kernel gives bitwise equal results at 1, 2, 3 and 4 threads.

The kernels partition their work by data size, never by thread count, and their products sum in a fixed order
(``csrc/cpu/gemm.h``), so setting the thread count must not change a single bit of any output or gradient.
The shapes are large enough for every kernel's parallel split (several tasks per thread at 4 threads) and,
for memory_nearest, for both search paths (tiled, and split-D for huge D).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import needs_ext

from dmgrd import ops

pytestmark = needs_ext
THREADS = (1, 2, 3, 4)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaN == NaN and -0.0 != 0.0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def at_threads(run: Callable[[], list[torch.Tensor]], threads: int) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ops.use_backend("ext"):
            return [bits(t) for t in run()]
    finally:
        torch.set_num_threads(before)


def assert_thread_independent(run: Callable[[], list[torch.Tensor]]) -> None:
    reference = at_threads(run, 1)
    for threads in THREADS[1:]:
        got = at_threads(run, threads)
        for i, (a, b) in enumerate(zip(reference, got, strict=True)):
            assert torch.equal(a, b), f"output {i} differs between 1 and {threads} threads"


def randn(gen, *shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(requires_grad)


def grads_of(output: torch.Tensor, inputs: list[torch.Tensor], gen) -> list[torch.Tensor]:
    upstream = torch.randn(output.shape, generator=gen, dtype=output.dtype)
    return list(torch.autograd.grad(output, inputs, upstream))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(600, 2500, 40, 3), (4, 6, 40000, 2), (64, 30, 70000, 5)],
                         ids=["tiled", "split-D", "image-level"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_memory_nearest(gen, metric, shape, dtype):
    rows, items, depth, k = shape
    query, bank = randn(gen, rows, depth, dtype=dtype), randn(gen, items, depth, dtype=dtype)
    assert_thread_independent(lambda: list(ops.memory_nearest(query, bank, k, metric)))


def test_dual_memory_margin(gen):
    query = randn(gen, 700, 48, requires_grad=True)
    normal, abnormal = randn(gen, 1500, 48, requires_grad=True), randn(gen, 900, 48, requires_grad=True)

    def run():
        outputs = ops.dual_memory_margin(query, normal, abnormal, margin=0.5)
        return [*outputs, *grads_of(outputs[-1], [query, normal, abnormal], torch.Generator().manual_seed(1))]

    assert_thread_independent(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_memory_readout_forward_and_backward(gen, dtype):
    query = randn(gen, 3000, 64, dtype=dtype, requires_grad=True)
    bank = randn(gen, 300, 64, dtype=dtype, requires_grad=True)

    def run():
        out = ops.memory_readout(query, bank, 0.1)
        return [out, *grads_of(out, [query, bank], torch.Generator().manual_seed(1))]

    assert_thread_independent(run)


@pytest.mark.parametrize("reduction,shape", [("flatten", (4, 64, 32, 32)), ("pixel", (4, 32, 64, 64))])
def test_cosine_kd_loss_forward_and_backward(gen, reduction, shape):
    batch, channels, height, width = shape
    levels = [(channels, height, width), (2 * channels, height // 2, width // 2)]
    teacher = [randn(gen, batch, c, h, w, requires_grad=True) for c, h, w in levels]
    student = [randn(gen, batch, c, h, w, requires_grad=True) for c, h, w in levels]

    def run():
        loss = ops.cosine_kd_loss(teacher, student, reduction)
        return [loss, *torch.autograd.grad(loss, teacher + student)]

    assert_thread_independent(run)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_pool_and_fuse_pyramid_forward_and_backward(gen, layout):
    format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    levels = [(32, 64, 64), (64, 32, 32), (128, 16, 16)]
    features = [randn(gen, 3, c, h, w).contiguous(memory_format=format).requires_grad_() for c, h, w in levels]
    logits = [randn(gen, 3, 1, h, w, requires_grad=True) for _, h, w in levels]

    def run():
        pooled = [ops.channel_pool(f) for f in features]
        fused = ops.fuse_pyramid(features, logits)
        outputs = pooled + fused
        upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
        return [*outputs, *torch.autograd.grad(outputs, features + logits, upstream)]

    assert_thread_independent(run)


@pytest.mark.parametrize("mode", ["max", "topk_mean"])
def test_image_score(gen, mode):
    maps = randn(gen, 16, 1, 128, 160)
    assert_thread_independent(lambda: [ops.image_score(maps, mode, k=100)])


def test_coreset_update_and_greedy_coreset(gen):
    points = randn(gen, 50000, 32)
    center = points[17]
    min_dist = torch.full((50000,), float("inf"))

    def run():
        new_min, farthest = ops.coreset_update(points, center, min_dist)
        return [new_min, farthest, ops.greedy_coreset(points, 20)]

    assert_thread_independent(run)


@pytest.mark.parametrize("reduce", ["sum", "mul"])
def test_anomaly_map(gen, reduce):
    levels = [(32, 64, 64), (64, 32, 32), (128, 16, 16)]
    teacher = [randn(gen, 4, c, h, w) for c, h, w in levels]
    student = [randn(gen, 4, c, h, w) for c, h, w in levels]
    assert_thread_independent(lambda: [ops.anomaly_map(teacher, student, (128, 96), reduce=reduce, sigma=4.0)])
