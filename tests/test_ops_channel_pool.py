"""dmgrd.ops.channel_pool (MSFF's spatial attention input: channel max and mean): the reference from first
principles, every backend (forward and backward, with ties and non-finite values) against it, gradcheck, fuzzing,
bad input. Tolerances are test_ops_fuse_pyramid's (the same float32 accumulation, rounded once)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import backend_cases, ext_loaded, needs_ext
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_fuse_pyramid import assert_close, skip_unless_runs, with_layout

from dmgrd import ops

pool_module = importlib.import_module("dmgrd.ops.channel_pool")


def check_pool_against_reference(backend, x, grad):
    ref_x = x.detach().cpu().double().requires_grad_()
    expected = ops.channel_pool_reference(ref_x)
    (expected_grad,) = torch.autograd.grad(expected, ref_x, grad.cpu().double())
    with ops.use_backend(backend):
        got = ops.channel_pool(x)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert got.dtype == x.dtype and got.device == x.device
    assert_close(got, expected, x.dtype, "pooled")
    assert_close(got_grad, expected_grad, x.dtype, "gradient of x")



# --- the reference -------------------------------------------------------------------------------------


def test_reference_pool_from_first_principles():
    x = torch.tensor([1.0, 5.0, -2.0, 5.0]).view(1, 4, 1, 1).requires_grad_()
    pooled = ops.channel_pool_reference(x)
    assert pooled.flatten().tolist() == [5.0, 2.25]
    pooled[0, 0].sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 0.5, 0.0, 0.5]  # the max's gradient is split among ties


# --- every backend against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_cases("channel_pool"))
# (16, 5, 64, 64): whole 4096-pixel images per task on the CPU (for up to 8 threads).
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 9), (2, 40, 33, 3), (1, 2048, 2, 3), (16, 5, 64, 64)])
def test_pool_matches_reference(gen, backend, device, shape):
    if backend == "triton":
        shape = (min(shape[0], 3), min(shape[1], 40), min(shape[2], 4), min(shape[3], 5))
    x = torch.randn(*shape, generator=gen).to(device).requires_grad_()
    check_pool_against_reference(backend, x, torch.randn(shape[0], 2, *shape[2:], generator=gen).to(device))


@pytest.mark.parametrize("backend,device", backend_cases("channel_pool"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_pool_dtypes_and_layouts(gen, backend, device, dtype, layout):
    skip_unless_runs(pool_module.OP, backend, device, dtype)
    x = with_layout(torch.randn(2, 19, 6, 7, generator=gen).to(dtype), layout).to(device).requires_grad_()
    check_pool_against_reference(backend, x, torch.randn(2, 2, 6, 7, generator=gen).to(dtype).to(device))


@pytest.mark.parametrize("backend,device", backend_cases("channel_pool", reference_too=True))
def test_pool_ties_split_the_gradient(gen, backend, device):
    """Few distinct values: most maxima are shared by several channels, each getting an equal share."""
    for shape in ((2, 9, 5, 4), (16, 6, 64, 64) if backend != "triton" else (1, 6, 3, 4)):
        x = torch.randint(0, 3, shape, generator=gen).float().to(device).requires_grad_()
        check_pool_against_reference(backend, x, torch.randn(shape[0], 2, *shape[2:], generator=gen).to(device))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
@pytest.mark.parametrize("backend,device", backend_cases("channel_pool", reference_too=True))
def test_pool_nan_and_infinities(gen, backend, device):
    """A NaN channel makes both maps NaN at its pixel only; +inf and -inf give max +inf and mean NaN."""
    x = torch.randn(2, 6, 3, 4, generator=gen)
    x[1, 4, 2, 1] = float("nan")
    x[0, 1, 1, 3], x[0, 5, 1, 3] = float("inf"), float("-inf")
    with ops.use_backend(backend):
        pooled = ops.channel_pool(x.to(device)).cpu()
    assert pooled[1, :, 2, 1].isnan().all()
    assert pooled[0, 0, 1, 3] == float("inf") and pooled[0, 1, 1, 3].isnan()
    pooled[1, :, 2, 1] = pooled[0, :, 1, 3] = 0
    assert torch.isfinite(pooled).all()


# --- gradcheck and fuzzing -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
def test_gradcheck_float64(gen, backend):
    x = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(ops.channel_pool, (x,))


@st.composite
def inputs(draw, max_size):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, max_size)),
             draw(st.integers(1, max_size)))
    return shape, draw(st.sampled_from(["contiguous", "channels_last", "strided"]))


def _fuzz(backend, case, seed, dtype):
    shape, layout = case
    gen = torch.Generator().manual_seed(seed)
    x = with_layout(torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype), layout).requires_grad_()
    check_pool_against_reference(backend, x, torch.randn(shape[0], 2, *shape[2:], generator=gen).to(dtype))


@pytest.mark.skipif(not ext_loaded(), reason="dmgrd._C is not loaded")
@settings(max_examples=200, deadline=None)
@given(case=inputs(max_size=20), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fuzz_ext(case, seed, dtype):
    _fuzz("ext", case, seed, dtype)


@pytest.mark.skipif(pool_module.OP.unavailable_reason("triton", "cpu") is not None,
                    reason="Triton on CPU needs the interpreter")
@settings(max_examples=20, deadline=None)  # the interpreter runs each launch in Python
@given(case=inputs(max_size=5), seed=st.integers(0, 2**31 - 1))
def test_fuzz_triton(case, seed):
    _fuzz("triton", case, seed, torch.float32)


# --- API -----------------------------------------------------------------------------------------------


def test_empty_batch_follows_the_reference():
    assert ops.channel_pool(torch.zeros(0, 3, 4, 4)).shape == (0, 2, 4, 4)


@pytest.mark.parametrize("x,message", [(torch.zeros(2, 0, 3, 3), "empty channel"), (torch.zeros(3, 3), "must be 4-D"),
                                       (torch.zeros(1, 2, 3, 3, dtype=torch.int32), "floating point")])
def test_pool_bad_input_raises_value_error(x, message):
    with pytest.raises(ValueError, match=message):
        ops.channel_pool(x)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(gen, layout):
    x = with_layout(torch.randn(2, 5, 7, 9, generator=gen), layout)
    pooled, ties = torch.ops.dmgrd.channel_pool(x)
    torch.library.opcheck(torch.ops.dmgrd.channel_pool.default, (x,))
    torch.library.opcheck(torch.ops.dmgrd.channel_pool_backward.default, (torch.randn_like(pooled), x, pooled, ties))
