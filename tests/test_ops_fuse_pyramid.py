"""dmgrd.ops.fuse_pyramid: the reference from first principles and against MSFF's original code, every backend
(forward and backward) against the reference, gradcheck, fuzzing, bad input. MSFF's channel pooling is
test_ops_channel_pool.py."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases, ext_loaded, needs_ext, record_margin
from hypothesis import given, settings
from hypothesis import strategies as st

from dmgrd import ops
from dmgrd.models.fusion import MSFF

fuse_module = importlib.import_module("dmgrd.ops.fuse_pyramid")

# Bound on |fast - float64 reference| / (1 + max |reference|). The fast backends compute in float32 and
# round once, so low-precision inputs are compared with the reference run in float64 on the same values.
# Measured over 20 seeds (tests/measure_margins.py): largest error 0.085 of the bound (float32), 0.16 (float16,
# bfloat16), 8e-6 (float64).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Per level (C, H, W), finest first; the mask chain upsamples each level to the next finer one's size.
PYRAMIDS = {
    "doubling": [(8, 16, 16), (16, 8, 8), (32, 4, 4)],
    "odd": [(5, 28, 36), (6, 14, 18), (7, 7, 9)],
    "inexact": [(3, 15, 17), (4, 7, 9), (5, 3, 4)],
    "same-size": [(3, 6, 5), (2, 6, 5)],
    "one-level": [(4, 5, 6)],
    "one-pixel": [(3, 2, 3), (2, 1, 1)],
    "large": [(128, 64, 64), (16, 32, 32)],  # outputs of MiBs: the C++ kernels back them with huge pages
}
TRITON_PYRAMID = [(3, 6, 7), (4, 3, 4), (5, 2, 2)]  # tiny, for the interpreter


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        view = torch.cat([x, torch.zeros_like(x)], dim=3)[..., ::2]
        view[...] = x
        return view
    raise ValueError(layout)


def make_pyramid(gen, batch, levels, dtype=torch.float32, layout="contiguous", device="cpu"):
    """Features, logits and upstream gradients (leaves requiring grad where they are inputs)."""

    def rand(*shape, scale=1.0):
        x = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
        return with_layout(x, layout).to(device)

    features = [rand(batch, c, h, w).requires_grad_() for c, h, w in levels]
    logits = [rand(batch, 1, h, w, scale=2.0).requires_grad_() for _, h, w in levels]
    grads = [rand(batch, c, h, w) for c, h, w in levels]
    return features, logits, grads


def _float64_leaves(tensors):
    return [t.detach().cpu().double().requires_grad_() for t in tensors]


def assert_close(got, expected, dtype, what):
    got, expected = got.detach().cpu().double(), expected.detach().double()
    assert got.shape == expected.shape, what
    bound = TOLERANCE[dtype] * (1 + expected.abs().max().item())
    err = (got - expected).abs().max().item()
    record_margin(err, bound, str(dtype))
    assert err <= bound, f"{what}: max abs error {err} > {bound}"


def check_fuse_against_reference(backend, features, logits, grads):
    dtype = features[0].dtype
    ref_features, ref_logits = _float64_leaves(features), _float64_leaves(logits)
    expected = ops.fuse_pyramid_reference(ref_features, ref_logits)
    expected_grads = torch.autograd.grad(expected, ref_features + ref_logits, [g.cpu().double() for g in grads])
    with ops.use_backend(backend):
        got = ops.fuse_pyramid(features, logits)
    got_grads = torch.autograd.grad(got, features + logits, grads)
    for level, (out, f) in enumerate(zip(got, features, strict=True)):
        assert out.dtype == dtype and out.device == f.device
        assert_close(out, expected[level], dtype, f"output {level}")
    for i, (g, e) in enumerate(zip(got_grads, expected_grads, strict=True)):
        assert_close(g, e, dtype, f"gradient of input {i}")


def skip_unless_runs(op, backend, device, dtype):
    reason = op.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("no bf16 arithmetic under the Triton interpreter")


def _pyramid_for(backend, name):
    return TRITON_PYRAMID if backend == "triton" else PYRAMIDS[name]


# --- the references ------------------------------------------------------------------------------------


def test_reference_masks_from_first_principles(gen):
    """Zero logits: every sigmoid is 1/2 and bilinear keeps constants, so the masks are 1/2, 1/4, 1/8."""
    features, _, _ = make_pyramid(gen, 2, PYRAMIDS["odd"])
    logits = [torch.zeros(2, 1, *f.shape[2:]) for f in features]
    out = ops.fuse_pyramid_reference(features, logits)
    for f, o, scale in zip(features, out, (0.125, 0.25, 0.5), strict=True):
        assert torch.allclose(o, f * scale, rtol=1e-6, atol=1e-7)


def original_msff_forward(msff: MSFF, inputs):
    """MSFF's forward before the ops existed (dmgrd/models/fusion.py at the base commit)."""

    def sam(x):
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return torch.sigmoid(msff.spatial_attention.conv(pooled))

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)

    f1, f2, f3 = (block(x) for block, x in zip(msff.blocks, inputs, strict=True))
    f2 = f2 + msff.top_down32(up(f3, f2))
    f1 = f1 + msff.top_down21(up(f2, f1))
    m3 = sam(inputs[2])
    m2 = sam(inputs[1]) * up(m3, inputs[1])
    m1 = sam(inputs[0]) * up(m2, inputs[0])
    return [f1 * m1, f2 * m2, f3 * m3]


def _msff_case(gen, sizes):
    msff = MSFF((4, 6, 8), attention="dot_product").double()  # float64: gradients that cancel to ~0 stay exact
    with torch.no_grad():  # random weights (the non-local blocks start as the identity: make them matter)
        for p in msff.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    inputs = [torch.randn(2, 2 * c, h, w, generator=gen, dtype=torch.float64).requires_grad_()
              for c, (h, w) in zip((4, 6, 8), sizes, strict=True)]
    return msff, inputs


def _msff_run(msff, inputs, forward):
    msff.zero_grad()
    outs = forward(inputs)
    upstream = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs + list(msff.parameters()), upstream)
    return [o.detach() for o in outs], grads


def _assert_runs_match(run, other, rtol):
    for a, b in zip(run[0] + list(run[1]), other[0] + list(other[1]), strict=True):
        record_margin((a - b).abs(), rtol * (1 + b.abs().max().item()) + rtol * b.abs(), f"msff rtol={rtol}")
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * (1 + b.abs().max().item()))  # some grads are ~0 noise


def test_msff_unchanged(gen):
    """The torch backend reproduces the original module (outputs bit for bit; gradients up to the order in
    which the shared 7x7 convolution's three uses are summed); the default backend (the C++ kernels when
    built) matches it in outputs and in the gradients of the inputs and of every parameter."""
    msff, inputs = _msff_case(gen, [(14, 18), (7, 9), (4, 5)])  # x2, then not exactly x2
    original = _msff_run(msff, inputs, lambda x: original_msff_forward(msff, x))
    with ops.use_backend("torch"):
        reference = _msff_run(msff, inputs, msff)
    assert all(torch.equal(a, b) for a, b in zip(original[0], reference[0], strict=True))
    # measured over 20 seeds: the torch backend's largest error 1.2e-4 of rtol=1e-12, the default's 0.0057 of 1e-10
    _assert_runs_match(original, reference, rtol=1e-12)
    _assert_runs_match(original, _msff_run(msff, inputs, msff), rtol=1e-10)


# --- every backend against the references --------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_cases("fuse_pyramid"))
@pytest.mark.parametrize("pyramid", list(PYRAMIDS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fuse_matches_reference(gen, backend, device, pyramid, batch):
    if backend == "triton" and pyramid != "odd":
        pytest.skip("one tiny pyramid under the Triton interpreter")
    features, logits, grads = make_pyramid(gen, batch, _pyramid_for(backend, pyramid), device=device)
    check_fuse_against_reference(backend, features, logits, grads)


@pytest.mark.parametrize("backend,device", backend_cases("fuse_pyramid"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fuse_dtypes_and_layouts(gen, backend, device, dtype, layout):
    skip_unless_runs(fuse_module.OP, backend, device, dtype)
    features, logits, grads = make_pyramid(gen, 2, _pyramid_for(backend, "odd"), dtype, layout, device)
    check_fuse_against_reference(backend, features, logits, grads)


# --- gradcheck and fuzzing -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
def test_gradcheck_float64(gen, backend):
    features, logits, _ = make_pyramid(gen, 1, [(2, 5, 6), (3, 3, 4)], torch.float64)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: ops.fuse_pyramid(t[:2], t[2:]), (*features, *logits))


@st.composite
def pyramids(draw, max_size):
    levels = draw(st.integers(1, 3))
    sizes = [(draw(st.integers(1, 6)), draw(st.integers(1, max_size)), draw(st.integers(1, max_size)))
             for _ in range(levels)]
    return draw(st.integers(1, 3)), sizes, draw(st.sampled_from(["contiguous", "channels_last", "strided"]))


def _fuzz(backend, case, seed, dtype):
    batch, levels, layout = case
    gen = torch.Generator().manual_seed(seed)
    features, logits, grads = make_pyramid(gen, batch, levels, dtype, layout)
    check_fuse_against_reference(backend, features, logits, grads)


@pytest.mark.skipif(not ext_loaded(), reason="dmgrd._C is not loaded")
@settings(max_examples=200, deadline=None)
@given(case=pyramids(max_size=20), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fuzz_ext(case, seed, dtype):
    _fuzz("ext", case, seed, dtype)


@pytest.mark.skipif(fuse_module.OP.unavailable_reason("triton", "cpu") is not None,
                    reason="Triton on CPU needs the interpreter")
@settings(max_examples=20, deadline=None)  # the interpreter runs each launch in Python: ~0.1 s per example
@given(case=pyramids(max_size=5), seed=st.integers(0, 2**31 - 1))
def test_fuzz_triton(case, seed):
    _fuzz("triton", case, seed, torch.float32)


# --- API -----------------------------------------------------------------------------------------------


def test_mixed_dtypes_promote(gen):
    features, logits, _ = make_pyramid(gen, 1, PYRAMIDS["odd"])
    half = [f.detach().half() for f in features]
    out = ops.fuse_pyramid(half, logits)
    assert all(o.dtype == torch.float32 for o in out)
    expected = ops.fuse_pyramid_reference([h.float() for h in half], logits)
    assert all(torch.allclose(o, e, rtol=1e-5, atol=1e-6) for o, e in zip(out, expected, strict=True))


def test_empty_batch_follows_the_reference():
    features = [torch.zeros(0, 3, 4, 4), torch.zeros(0, 2, 2, 2)]
    logits = [torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 2, 2)]
    assert [o.shape for o in ops.fuse_pyramid(features, logits)] == [f.shape for f in features]


F4 = torch.zeros(2, 3, 4, 4)
A4 = torch.zeros(2, 1, 4, 4)


@pytest.mark.parametrize(
    "features,logits,message",
    [
        (F4, [A4], "features must be a list"),
        ([], [], "features is empty"),
        ([F4], [A4, A4], "features has 1 levels but logits has 2"),
        ([F4], [torch.zeros(2, 2, 4, 4)], r"logits must be \[B, 1, H, W\]"),
        ([F4], [torch.zeros(2, 1, 4, 5)], r"logits must be \[B, 1, H, W\]"),
        ([F4, torch.zeros(3, 3, 2, 2)], [A4, torch.zeros(3, 1, 2, 2)], "level 1 has batch 3"),
        ([F4.long()], [A4], "must be floating point"),
        ([torch.zeros(2, 3, 4)], [A4], "must be 4-D"),
        ([torch.zeros(2, 3, 0, 4)], [torch.zeros(2, 1, 0, 4)], "empty channel or spatial dimension"),
        ([F4], ["logits"], "must be a tensor"),
    ],
)
def test_fuse_bad_input_raises_value_error(features, logits, message):
    with pytest.raises(ValueError, match=message):
        ops.fuse_pyramid(features, logits)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(gen, layout):
    features, logits, grads = make_pyramid(gen, 2, PYRAMIDS["inexact"], layout=layout)
    features, logits = [f.detach() for f in features], [a.detach() for a in logits]
    torch.library.opcheck(torch.ops.dmgrd.fuse_pyramid.default, (features, logits))
    torch.library.opcheck(torch.ops.dmgrd.fuse_pyramid_backward.default, (grads, features, logits))
