"""dmgrd.ops.cosine_kd_loss: the torch reference against first principles, every backend against it (loss and
gradients), and kd_loss on top of it."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases, needs_ext, record_margin
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_anomaly_map import make_pyramid

from dmgrd import ops
from dmgrd.losses import kd_loss

kd_module = importlib.import_module("dmgrd.ops.cosine_kd_loss")  # the function shadows the module name

REDUCTIONS = ("flatten", "pixel")
SHAPE_SETS = {
    "pyramid": [(16, 16, 16), (32, 8, 8), (64, 4, 4)],
    "odd": [(5, 7, 13), (3, 1, 1), (9, 11, 4)],
    "one-level": [(6, 3, 5)],
}
# Every backend accumulates in float32 from the same input values as the reference, so the loss keeps the float32
# tolerance for half inputs; half gradients are rounded once to their dtype (relative to the largest gradient).
# Measured over 20 seeds (tests/measure_margins.py): loss error 0.083 of LOSS_TOL (float32), 0.11 (float16), 0.024
# (bfloat16), 9e-4 (float64); gradient error 0.020 of GRAD_TOL (float32, float16), 0.031 (bfloat16), 4e-4 (float64).
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def _loss_and_grads(teacher, student, reduction, backend=None):
    """Loss and d loss / d (student, teacher) of leaf copies of the features (teacher grads only if asked)."""
    student = [s.detach().clone().requires_grad_(True) for s in student]
    with ops.use_backend(backend or "torch"):
        loss = ops.cosine_kd_loss(teacher, student, reduction)
    wrt = student + [t for t in teacher if t.requires_grad]
    return loss, torch.autograd.grad(loss, wrt)


def _gradient_scale(t: torch.Tensor, s: torch.Tensor, reduction: str) -> float:
    """The largest 1 / (rows * |row|): the size of a level's gradient terms before they cancel (as they do
    where the cosine is ±1), so gradient errors are measured against it."""
    rows = [x.double().flatten(1) if reduction == "flatten" else x.double().movedim(1, -1).flatten(0, 2)
            for x in (t, s)]
    norms = torch.minimum(*(r.norm(dim=1) for r in rows)).clamp_min(1e-8)
    return (1 / (norms * norms.numel())).max().item()


def _check_backend(backend, device, teacher, student, reduction):
    cpu_t = [x.detach().cpu().requires_grad_(x.requires_grad) for x in teacher]
    cpu_s = [s.detach().cpu() for s in student]
    expected, expected_grads = _loss_and_grads(cpu_t, cpu_s, reduction)
    got, grads = _loss_and_grads(teacher, student, reduction, backend)
    dtype = teacher[0].dtype
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.device.type == device
    record_margin(abs(got.item() - expected.item()), LOSS_TOL[dtype], f"loss {dtype}")
    assert abs(got.item() - expected.item()) <= LOSS_TOL[dtype], (got.item(), expected.item())
    scales = [_gradient_scale(t, s, reduction) for t, s in zip(cpu_t, cpu_s, strict=True)]
    scales += [scale for scale, t in zip(scales, cpu_t, strict=True) if t.requires_grad]
    for g, e, scale in zip(grads, expected_grads, scales, strict=True):  # student gradients, then the teacher's
        assert g.shape == e.shape and g.dtype == e.dtype
        err = (g.cpu().double() - e.double()).abs().max().item()
        record_margin(err, GRAD_TOL[dtype] * max(e.abs().max().item(), scale), f"grad {dtype}")
        assert err <= GRAD_TOL[dtype] * max(e.abs().max().item(), scale), f"gradient error {err}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_first_principles(gen, reduction):
    teacher, student = make_pyramid(gen, 3, SHAPE_SETS["odd"], dtype=torch.float64)
    assert ops.cosine_kd_loss_reference(teacher, teacher, reduction).abs() < 1e-12
    opposite = ops.cosine_kd_loss_reference(teacher, [-t for t in teacher], reduction)
    assert abs(opposite.item() - 2 * len(teacher)) < 1e-12  # 1 - (-1) per level
    scale = [torch.rand(3, 1, *t.shape[2:], generator=gen, dtype=torch.float64) + 0.5 for t in teacher]
    per_pixel = ops.cosine_kd_loss_reference(teacher, [t * s for t, s in zip(teacher, scale, strict=True)], "pixel")
    assert per_pixel.abs() < 1e-12  # a positive rescaling of each pixel keeps its cosine
    expected = 0.0
    for t, s in zip(teacher, student, strict=True):
        vec_t, vec_s = (t.flatten(1), s.flatten(1)) if reduction == "flatten" else (t, s)
        cos = (vec_t * vec_s).sum(1) / (vec_t.norm(dim=1) * vec_s.norm(dim=1))
        expected += (1 - cos).mean().item()
    assert abs(ops.cosine_kd_loss_reference(teacher, student, reduction).item() - expected) < 1e-12


def test_reference_computes_in_float32_and_float64():
    teacher = [torch.ones(1, 2, 1, 1, dtype=torch.bfloat16)]
    assert ops.cosine_kd_loss_reference(teacher, teacher).dtype == torch.float32
    assert ops.cosine_kd_loss_reference([t.double() for t in teacher], [t.double() for t in teacher]).dtype == (
        torch.float64
    )


@pytest.mark.parametrize("backend,device", backend_cases("cosine_kd_loss"))
@pytest.mark.parametrize("shape_set", list(SHAPE_SETS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference(gen, backend, device, shape_set, batch, reduction):
    teacher, student = make_pyramid(gen, batch, SHAPE_SETS[shape_set], device=device)
    _check_backend(backend, device, teacher, student, reduction)


@pytest.mark.parametrize("backend,device", backend_cases("cosine_kd_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "transposed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_dtypes_and_layouts(gen, backend, device, dtype, layout, reduction):
    reason = kd_module.OP.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("no bfloat16 arithmetic in the Triton interpreter")
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["odd"], dtype=dtype, layout=layout, device=device)
    _check_backend(backend, device, teacher, student, reduction)


@pytest.mark.parametrize("backend,device", backend_cases("cosine_kd_loss"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_teacher_gradients_and_mixed_layouts(gen, backend, device, reduction):
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["pyramid"], device=device)
    teacher = [t.requires_grad_(True) for t in teacher]
    student = [s.contiguous(memory_format=torch.channels_last) for s in student]
    _check_backend(backend, device, teacher, student, reduction)


@pytest.mark.parametrize("backend,device", backend_cases("cosine_kd_loss", reference_too=True))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_identical_features_give_zero_loss_and_gradient(gen, backend, device, reduction):
    teacher, _ = make_pyramid(gen, 2, SHAPE_SETS["odd"], device=device)
    loss, grads = _loss_and_grads(teacher, teacher, reduction, backend)
    assert abs(loss.item()) < 1e-6
    assert max(g.abs().max().item() for g in grads) < 1e-6


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(gen, backend, reduction):
    teacher, student = make_pyramid(gen, 2, [(3, 2, 3), (4, 1, 2)], dtype=torch.float64)
    leaves = [x.requires_grad_(True) for x in teacher + student]

    def loss(*feats):
        with ops.use_backend(backend):
            return ops.cosine_kd_loss(list(feats[:2]), list(feats[2:]), reduction)

    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device", backend_cases("cosine_kd_loss"))
def test_gradient_at_a_zero_vector_matches_cosine_similarity(backend, device):
    # F.cosine_similarity clamps each norm to 1e-8 and differentiates |x| as x / |x| (0 at x = 0)
    teacher = [torch.tensor([[[[1.0]], [[2.0]]], [[[0.5]], [[-1.0]]]], device=device)]
    student = [torch.tensor([[[[0.0]], [[0.0]]], [[[3e-9]], [[1e-9]]]], device=device)]
    for reduction in REDUCTIONS:
        _check_backend(backend, device, teacher, student, reduction)


def test_auto_backend_is_differentiable_fast_path(gen):
    teacher, student = make_pyramid(gen, 1, [(4, 3, 3)])
    student[0].requires_grad_(True)
    expected = "ext" if ops.backends()["ext"].available else "torch"
    assert kd_module.OP.select(teacher + student) == expected


def test_kd_loss_runs_the_op_and_its_reference_under_torch(gen):
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["pyramid"])
    for reduction in REDUCTIONS:
        with ops.use_backend("torch"):
            reference = kd_loss(teacher, student, reduction)
        assert abs(kd_loss(teacher, student, reduction).item() - reference.item()) < 1e-5
    with pytest.raises(ValueError, match="kd_reduction"):
        kd_loss(teacher, student, "mean")


def test_mixed_dtypes_are_promoted(gen):
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["odd"])
    mixed = [student[0].half(), student[1], student[2].double()]
    loss = ops.cosine_kd_loss(teacher, mixed)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ops.cosine_kd_loss_reference(teacher, [m.float() for m in mixed]).item()) < 1e-5


def test_empty_batch_is_nan(gen):
    teacher, student = make_pyramid(gen, 1, [(4, 3, 3)])
    assert ops.cosine_kd_loss([teacher[0][:0]], [student[0][:0]]).isnan()


def test_bad_inputs_raise_value_error(gen):
    t, s = make_pyramid(gen, 2, [(4, 8, 8), (8, 4, 4)])
    cases = [
        (([], []), "teacher_feats is empty"),
        ((t, s[:1]), "2 levels but student_feats has 1"),
        (([t[0][0]], [s[0][0]]), r"teacher_feats\[0\] must be 4-D"),
        ((t, [s[0][:, :3], s[1]]), "level 0: teacher has 4 channels but student has 3"),
        ((t, [s[0][:, :, :7], s[1]]), "level 0: teacher spatial size"),
        (([t[0].long()], [s[0].long()]), "must be floating point"),
    ]
    for (teacher, student), message in cases:
        with pytest.raises(ValueError, match=message):
            ops.cosine_kd_loss(teacher, student)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cosine_kd_loss(t, s, "mean")


@st.composite
def pyramids(draw, max_side: int):
    """(batch, [(C, H, W) per level], reduction, channels_last)."""
    batch = draw(st.integers(1, 3))
    dims = st.tuples(st.integers(1, 3 * max_side), st.integers(1, max_side), st.integers(1, max_side))
    shapes = draw(st.lists(dims, min_size=1, max_size=3))
    return batch, shapes, draw(st.sampled_from(REDUCTIONS)), draw(st.booleans())


def _fuzz(backend: str, case, seed: int) -> None:
    reason = kd_module.OP.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)
    batch, shapes, reduction, channels_last = case
    layout = "channels_last" if channels_last else "contiguous"
    teacher, student = make_pyramid(torch.Generator().manual_seed(seed), batch, shapes, layout=layout)
    _check_backend(backend, "cpu", teacher, student, reduction)


@settings(max_examples=200, deadline=None)
@given(case=pyramids(max_side=9), seed=st.integers(0, 2**31 - 1))
def test_fuzz_ext_cpu(case, seed):
    _fuzz("ext", case, seed)


# The interpreter costs ~0.1 s per example (each nested jit call, tl.sum included, re-patches triton.language),
# so Triton gets fewer examples than the extension; its parametrized tests above cover layouts and dtypes.
@settings(max_examples=50, deadline=None)
@given(case=pyramids(max_side=3), seed=st.integers(0, 2**31 - 1))
def test_fuzz_triton_interpreter(case, seed):
    _fuzz("triton", case, seed)


def test_fake_kernels_match_the_real_outputs(gen):
    if not ops.backends()["ext"].available:
        pytest.skip("dmgrd._C is not loaded")
    from torch._subclasses.fake_tensor import FakeTensorMode

    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["odd"], layout="channels_last")
    for reduction in REDUCTIONS:
        loss, coeffs = torch.ops.dmgrd.cosine_kd_loss_forward(teacher, student, reduction)
        grads = torch.ops.dmgrd.cosine_kd_loss_backward(loss, teacher, student, coeffs, reduction, True)
        with FakeTensorMode() as mode:
            fake_t = [mode.from_tensor(t) for t in teacher]
            fake_s = [mode.from_tensor(s) for s in student]
            fake_loss, fake_coeffs = torch.ops.dmgrd.cosine_kd_loss_forward(fake_t, fake_s, reduction)
            fake_grads = torch.ops.dmgrd.cosine_kd_loss_backward(
                fake_loss, fake_t, fake_s, fake_coeffs, reduction, True
            )
        for real, fake in zip([loss, coeffs, *grads[0], *grads[1]], [fake_loss, fake_coeffs, *fake_grads[0],
                                                                      *fake_grads[1]], strict=True):
            assert real.shape == fake.shape and real.dtype == fake.dtype and real.stride() == fake.stride()


def test_cosine_similarity_semantics_of_reference(gen):
    teacher, student = make_pyramid(gen, 2, [(5, 3, 4)])
    expected = (1 - F.cosine_similarity(teacher[0], student[0], dim=1)).mean()
    assert torch.equal(ops.cosine_kd_loss_reference(teacher, student, "pixel"), expected)
