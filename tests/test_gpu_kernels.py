"""GPU-only failure modes of the CUDA and Triton kernels (docs/gpu.md): real WRN50 shapes at batch 64, offsets
past 2^31 elements, a second device, empty batches, bf16 accumulation. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from dmgrd import ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BACKENDS = ["ext", pytest.param("triton", marks=pytest.mark.triton)]


def on_cuda_backends(test):
    """Marked ``cuda``, skipped without a device, run for each backend (the Triton case also marked ``triton``)."""
    return pytest.mark.cuda(needs_cuda(pytest.mark.parametrize("backend", BACKENDS)(test)))


WRN50 = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]


def pyramid(batch: int, device, dtype=torch.float32, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator(device).manual_seed(seed)
    teacher = [torch.randn(batch, *shape, generator=gen, device=device).to(dtype) for shape in WRN50]
    student = [(t.float() + 0.3 * torch.randn(t.shape, generator=gen, device=device)).to(dtype) for t in teacher]
    return teacher, student


def on(backend: str, fn):
    with ops.use_backend(backend):
        return fn()


def skip_unavailable(op: str, backend: str, dtype=torch.float32) -> None:
    reason = ops._dispatch.OPS[op].unavailable_reason(backend, "cuda", dtype)
    if reason is not None:
        pytest.skip(reason)


@on_cuda_backends
def test_wrn50_pyramid_at_batch_64_matches_the_reference(backend):
    skip_unavailable("anomaly_map", backend)
    teacher, student = pyramid(64, "cuda")
    expected = on("torch", lambda: ops.anomaly_map(teacher, student, 256))
    torch.testing.assert_close(on(backend, lambda: ops.anomaly_map(teacher, student, 256)), expected,
                               rtol=1e-4, atol=1e-4)
    for reduction in ("flatten", "pixel"):
        expected = on("torch", lambda r=reduction: ops.cosine_kd_loss(teacher, student, r))
        got = on(backend, lambda r=reduction: ops.cosine_kd_loss(teacher, student, r))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@on_cuda_backends
def test_bf16_inputs_accumulate_in_float32(backend):
    """1 - cos over 1024 bf16 channels: float32 sums stay within the bf16 rounding of the output (a bf16
    accumulator would drift by far more)."""
    skip_unavailable("anomaly_map", backend, torch.bfloat16)
    teacher, student = pyramid(8, "cuda", torch.bfloat16)
    exact = on("torch", lambda: ops.anomaly_map([t.double() for t in teacher], [s.double() for s in student], 256,
                                                sigma=0))
    got = on(backend, lambda: ops.anomaly_map(teacher, student, 256, sigma=0)).double()
    assert (got - exact).abs().max() <= 2 ** -7 * exact.abs().max()


@on_cuda_backends
def test_offsets_past_two_to_the_31_elements(backend):
    """One image of 40 x 8192 x 8192 bf16 values (2.7e9 elements): channel offsets need 64 bits."""
    skip_unavailable("channel_pool", backend, torch.bfloat16)
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.zeros(1, 40, 8192, 8192, dtype=torch.bfloat16, device="cuda")
    x[0, 39, -1, -1] = 4.0  # the last element, at offset 2^31 + ...; the channel maximum there must see it
    pooled = on(backend, lambda: ops.channel_pool(x))
    assert pooled[0, 0, -1, -1] == 4.0 and abs(pooled[0, 1, -1, -1].item() - 0.1) < 1e-3  # max, mean
    assert pooled[0, 0, -1, -2] == 0.0 and pooled[0, 0, 0, 0] == 0.0


@on_cuda_backends
def test_empty_batch_gives_empty_results(backend):
    skip_unavailable("anomaly_map", backend)
    teacher, student = pyramid(0, "cuda")
    assert on(backend, lambda: ops.anomaly_map(teacher, student, 256)).shape == (0, 1, 256, 256)
    maps = torch.empty(0, 1, 8, 8, device="cuda")
    assert on("torch", lambda: ops.image_score(maps, "max")).shape == (0,)
    assert on(backend, lambda: ops.image_score(maps, "max")).shape == (0,)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@on_cuda_backends
def test_kernels_run_on_the_tensors_device_not_the_current_one(backend):
    skip_unavailable("fuse_pyramid", backend)
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 8, s, s, generator=gen).to("cuda:1") for s in (16, 8, 4)]
    logits = [torch.randn(2, 1, s, s, generator=gen).to("cuda:1") for s in (16, 8, 4)]
    with torch.cuda.device(0):
        got = on(backend, lambda: ops.fuse_pyramid(features, logits))
        pooled = on(backend, lambda: ops.channel_pool(features[0]))
    expected = on("torch", lambda: ops.fuse_pyramid(features, logits))
    for g, e in zip(got, expected, strict=True):
        assert g.device == torch.device("cuda:1")
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, on("torch", lambda: ops.channel_pool(features[0])), rtol=1e-5, atol=1e-6)


@on_cuda_backends
def test_kernels_run_on_the_current_stream(backend):
    """Work queued on a side stream is ordered before the op's kernels only if they run on that stream."""
    skip_unavailable("anomaly_map", backend)
    teacher, student = pyramid(4, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        shifted = [s * 2.0 + 1.0 for s in student]  # queued on `stream`, read by the op on `stream`
        got = on(backend, lambda: ops.anomaly_map(teacher, shifted, 256))
    torch.cuda.current_stream().wait_stream(stream)
    expected = on("torch", lambda: ops.anomaly_map(teacher, [s * 2.0 + 1.0 for s in student], 256))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
def test_triton_refuses_a_batch_past_the_grid_limit_before_launching():
    """Checked on the host, so this runs (and raises) in the interpreter too."""
    pytest.importorskip("triton")
    from dmgrd.kernels.pixel_tiles import MAX_GRID_YZ, batch_axis

    assert batch_axis(MAX_GRID_YZ, "op") == MAX_GRID_YZ
    with pytest.raises(ValueError, match="at most 65535 images per call, got 65536; split the batch"):
        batch_axis(MAX_GRID_YZ + 1, "op")
