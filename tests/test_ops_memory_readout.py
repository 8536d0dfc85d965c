"""dmgrd.ops.memory_readout: the reference from first principles, every backend's forward and backward against it."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import FULLGRAPH_THROUGH_OPS, backend_cases, needs_ext, record_margin
from hypothesis import given, settings
from hypothesis import strategies as st

from dmgrd import ops
from dmgrd.ops._dispatch import triton_interpreted

readout_module = importlib.import_module("dmgrd.ops.memory_readout")  # the function shadows the module name

# (forward: |got - expected| <= tol (1 + |expected|), gradients: max error / max(1, max |reference gradient|)).
# With one memory item the query gradient is exactly zero and the reference's is rounding noise.
# float32 and float64 differ from the reference in summation order only; half inputs round the output (and,
# in Triton, the probabilities and dS before their tensor-core products) to the input dtype.
# Measured over 20 seeds (tests/measure_margins.py): forward error 0.22 of the bound (float32), 0.16 (float16), 0.027
# (bfloat16), 0.0014 (float64); gradient error 0.13 (float32), 0.15 (float16), 0.22 (bfloat16), 0.0052 (float64).
TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (3e-2, 5e-2),
}
CASES = [  # (N, M, D, temperature): single items, single queries, odd sizes, several tiles of every axis
    (1, 1, 1, 0.5),
    (1, 5, 7, 1.0),
    (19, 1, 16, 0.05),
    (33, 20, 17, 0.1),
]
LARGE = (130, 300, 40, 0.05)  # several CPU query blocks and bank tiles; too slow for the Triton interpreter


def random_inputs(gen, n, m, d, dtype=torch.float32, device="cpu"):
    """Queries near random memory items (so attention is peaked but not one-hot), the bank, an output gradient."""
    bank = torch.randn(m, d, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, m, (n,), generator=gen)
    query = bank[pick] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return tuple(t.to(device, dtype) for t in (query, bank, grad))


def readout_and_grads(backend, query, bank, temperature, grad):
    """(out, grad_query, grad_bank) of ``backend`` ("torch" is the reference) for leaf copies of the inputs."""
    query, bank = query.detach().requires_grad_(), bank.detach().requires_grad_()
    with ops.use_backend(backend):
        out = ops.memory_readout(query, bank, temperature)
    out.backward(grad)
    return out.detach(), query.grad, bank.grad


def check_against_reference(backend, query, bank, temperature, grad):
    expected = readout_and_grads("torch", query.cpu(), bank.cpu(), temperature, grad.cpu())
    got = readout_and_grads(backend, query, bank, temperature, grad)
    atol, grad_tol = TOLERANCE[query.dtype]
    out, ref = got[0].cpu().double(), expected[0].double()
    assert got[0].dtype == query.dtype and got[0].shape == query.shape and got[0].device == query.device
    record_margin((out - ref).abs(), atol * (1 + ref.abs()), f"forward {query.dtype}")
    assert ((out - ref).abs() <= atol + atol * ref.abs()).all(), f"forward max error {(out - ref).abs().max()}"
    for name, g, r in zip(("query", "bank"), got[1:], expected[1:], strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert_gradient_close(g, r, grad_tol, name)


def assert_gradient_close(got, ref, tol, name):
    """Max error relative to the largest reference gradient (or 1): every element sums terms that large, so
    float32 rounding scales with it, not with the element (small elements carry that absolute error too)."""
    err = (got.cpu().double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)
    record_margin(err.item(), tol, f"grad {got.dtype}")
    assert err <= tol, f"grad {name}: error {err} relative to the largest reference gradient (or 1)"


def skip_unless_runs(backend, device, dtype):
    reason = readout_module.OP.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    if backend == "triton" and triton_interpreted() and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")


def test_reference_limits(gen):
    query, bank, _ = random_inputs(gen, 9, 6, 5)
    cos = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    best = cos.argmax(1)
    # At a small temperature the readout is the nearest item m_b plus sum_j w_j (m_j - m_b) with every weight
    # w_j <= exp(-(cos_b - cos_j) / T): within that bound of m_b (about 0 where the nearest item is clear, but
    # random items can come within T of each other's cosine).
    runner_up_weights = torch.exp((cos - cos.gather(1, best[:, None])) / 1e-4)
    bound = (runner_up_weights[:, :, None] * (bank[None] - bank[best][:, None]).abs()).sum(1)
    assert ((ops.memory_readout_reference(query, bank, 1e-4) - bank[best]).abs() <= bound + 1e-4).all()
    uniform = ops.memory_readout_reference(query, bank, 1e6)
    assert torch.allclose(uniform, bank.mean(0).expand_as(uniform), atol=1e-4)
    assert torch.allclose(ops.memory_readout_reference(3 * query, bank, 0.2),
                          ops.memory_readout_reference(query, bank, 0.2), atol=1e-6)  # cosine ignores scale


def test_reference_matches_explicit_attention(gen):
    query, bank, _ = random_inputs(gen, 7, 4, 3, torch.float64)
    cos = torch.stack([torch.stack([torch.dot(q, m) / (q.norm() * m.norm()) for m in bank]) for q in query])
    weights = torch.exp(cos / 0.3) / torch.exp(cos / 0.3).sum(1, keepdim=True)
    assert torch.allclose(ops.memory_readout_reference(query, bank, 0.3), weights @ bank, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_cases("memory_readout"))
@pytest.mark.parametrize("n,m,d,temperature", [*CASES, pytest.param(*LARGE, id="large")])
def test_backend_matches_reference(gen, backend, device, n, m, d, temperature):
    if (n, m, d, temperature) == LARGE and backend == "triton" and triton_interpreted():
        pytest.skip("too large for the Triton interpreter")
    query, bank, grad = random_inputs(gen, n, m, d, device=device)
    check_against_reference(backend, query, bank, temperature, grad)


@pytest.mark.parametrize("backend,device", backend_cases("memory_readout"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
def test_backend_dtypes(gen, backend, device, dtype):
    skip_unless_runs(backend, device, dtype)
    query, bank, grad = random_inputs(gen, 21, 18, 19, dtype, device)
    check_against_reference(backend, query, bank, 0.1, grad)


@pytest.mark.parametrize("backend,device", backend_cases("memory_readout"))
def test_non_contiguous_inputs(gen, backend, device):
    query, bank, grad = random_inputs(gen, 20, 17, 18, device=device)
    query = query.T.contiguous().T  # column-major
    bank = torch.cat([bank, bank], 1)[:, ::2]  # every other column of a wider tensor
    grad = grad[:1].expand_as(grad)  # stride 0 along the rows, like the gradient of a sum
    assert not (query.is_contiguous() or bank.is_contiguous() or grad.is_contiguous())
    check_against_reference(backend, query, bank, 0.2, grad)


@pytest.mark.parametrize("backend,device", backend_cases("memory_readout"))
def test_zero_rows_follow_the_clamped_norm(gen, backend, device):
    query, bank, grad = random_inputs(gen, 6, 5, 4, device=device)
    query[2] = 0  # F.normalize clamps these norms: uniform attention, gradient without the norm's own term
    bank[3] = 0
    check_against_reference(backend, query, bank, 0.5, grad)


def test_gradcheck_reference(gen):
    query, bank, _ = random_inputs(gen, 5, 4, 3, torch.float64)
    query.requires_grad_()
    bank.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, b: ops.memory_readout_reference(q, b, 0.3), (query, bank))


@needs_ext
@pytest.mark.parametrize("n,m,d,temperature,fast_mode", [(5, 4, 3, 0.3, False), (70, 3, 2, 0.05, True),
                                                         (3, 130, 2, 1.0, True)])
def test_gradcheck_ext_autograd_function(gen, n, m, d, temperature, fast_mode):
    query, bank, _ = random_inputs(gen, n, m, d, torch.float64)
    query.requires_grad_()
    bank.requires_grad_()

    def fast(q, b):
        return readout_module._MemoryReadout.apply(q, b, temperature, readout_module.EXT_KERNELS)

    assert torch.autograd.gradcheck(fast, (query, bank), fast_mode=fast_mode)


def fuzz_case(backend, n, m, d, temperature, seed):
    # Fuzzing draws D >= 2: with one feature the query gradient is exactly zero and both sides return rounding
    # noise that grows like 1 / |q| (CASES covers D = 1).
    query, bank, grad = random_inputs(torch.Generator().manual_seed(seed), n, m, d)
    check_against_reference(backend, query, bank, temperature, grad)


@needs_ext
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 150), m=st.integers(1, 300), d=st.integers(2, 40), temperature=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_ext_cpu(n, m, d, temperature, seed):
    fuzz_case("ext", n, m, d, temperature, seed)


# The interpreter takes ~0.1 s per tiny forward + backward: 200 examples would blow the file's time budget.
@pytest.mark.skipif(readout_module.OP.unavailable_reason("triton", "cpu") is not None,
                    reason="Triton on CPU needs TRITON_INTERPRET=1")
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), m=st.integers(1, 20), d=st.integers(2, 20), temperature=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_triton_interpreted(n, m, d, temperature, seed):
    fuzz_case("triton", n, m, d, temperature, seed)


def test_requires_grad_goes_to_the_fast_path(gen):
    query, bank, _ = random_inputs(gen, 3, 4, 5)
    bank.requires_grad_()
    assert readout_module.OP.select([query, bank]) == ("ext" if ops.backends()["ext"].available else "torch")


@pytest.mark.parametrize("shape", [(0, 6), (4, 0)])
def test_empty_queries_or_features(gen, shape):
    query = torch.randn(*shape, generator=gen)
    out = ops.memory_readout(query, torch.randn(3, shape[1], generator=gen))
    assert out.shape == shape


def _bad_inputs(gen):
    q, b, _ = random_inputs(gen, 4, 3, 5)
    return [
        ((q[0], b, 0.1), "query must be a 2-D tensor"),
        ((q, b[None], 0.1), "bank must be a 2-D tensor"),
        ((q.long(), b, 0.1), "query must be floating point"),
        ((q, b[:, :4], 0.1), "same feature size D, got 5 and 4"),
        ((q, b[:0], 0.1), "bank has no memory items"),
        ((q, b.double(), 0.1), "must share device and dtype"),
        ((q, b, 0.0), "temperature must be > 0"),
        ((q, b, float("nan")), "temperature must be > 0"),
        (("q", b, 0.1), "query must be a 2-D tensor"),
    ]


def test_bad_inputs_raise_value_error(gen):
    for args, message in _bad_inputs(gen):
        with pytest.raises(ValueError, match=message):
            ops.memory_readout(*args)


@needs_ext
def test_opcheck(gen):
    query, bank, grad = random_inputs(gen, 9, 7, 6)
    torch.library.opcheck(torch.ops.dmgrd.memory_readout.default, (query, bank, 0.2))
    out, lse, norm = torch.ops.dmgrd.memory_readout(query, bank, 0.2)
    torch.library.opcheck(torch.ops.dmgrd.memory_readout_backward.default, (grad, query, bank, out, lse, norm, 0.2))


@needs_ext
def test_compiles_through_the_autograd_function(gen):
    query, bank, _ = random_inputs(gen, 30, 20, 16)

    @torch.compile(backend="aot_eager", fullgraph=FULLGRAPH_THROUGH_OPS)
    def loss(q, b):
        return ops.memory_readout(q, b, 0.1).square().sum()

    grads = torch.autograd.grad(loss(query.requires_grad_(), bank.requires_grad_()), (query, bank))
    expected = torch.autograd.grad(ops.memory_readout_reference(query, bank, 0.1).square().sum(), (query, bank))
    for name, got, ref in zip(("query", "bank"), grads, expected, strict=True):
        assert_gradient_close(got, ref, TOLERANCE[torch.float32][1], name)
