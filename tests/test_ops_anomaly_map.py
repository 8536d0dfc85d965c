"""dmgrd.ops.anomaly_map: the torch reference against scipy and first principles, every backend against it."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FULLGRAPH_THROUGH_OPS, backend_cases, needs_ext, record_margin
from scipy.ndimage import gaussian_filter

from dmgrd import ops

anomaly_map_module = importlib.import_module("dmgrd.ops.anomaly_map")  # the function shadows the module name

# Every backend accumulates in float32 from the same (upcast) input values, so half inputs keep the
# float32 tolerance; only summation order differs from the reference.
# Measured over 20 seeds (tests/measure_margins.py): largest error 0.060 of the bound (float32), 0.036 (float16,
# bfloat16), 0.0013 (float64).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}

SHAPE_SETS = {
    "pyramid": ([(16, 16, 16), (32, 8, 8), (64, 4, 4)], (32, 32)),
    "odd": ([(5, 7, 13), (3, 1, 1), (9, 11, 4)], (37, 51)),
    "one-pixel-out": ([(6, 3, 5)], (1, 1)),
}


def make_pyramid(gen, batch, shapes, dtype=torch.float32, layout="contiguous", device="cpu"):
    """Teacher and student feature lists with correlated values (so maps are not all near 1)."""
    teacher, student = [], []
    for channels, height, width in shapes:
        base = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
        noise = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
        for out, x in ((teacher, base), (student, base + 0.7 * noise)):
            out.append(_layout(x.to(dtype), layout, gen).to(device))
    return teacher, student


def _layout(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other channel and column of a larger tensor
        big = torch.randn(x.shape[0], 2 * x.shape[1], x.shape[2], 2 * x.shape[3], generator=gen).to(x.dtype)
        big[:, ::2, :, ::2] = x
        view = big[:, ::2, :, ::2]
        assert not view.is_contiguous()
        return view
    if layout == "transposed":  # H and W swapped in memory
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("size", [(1, 1), (3, 50), (40, 37), (64, 64)])
def test_blur_reference_matches_scipy(gen, size, sigma):
    maps = torch.rand(2, 1, *size, generator=gen, dtype=torch.float64)
    ours = ops.gaussian_blur_reference(maps, sigma)
    for i in range(maps.shape[0]):
        expected = gaussian_filter(maps[i, 0].numpy(), sigma=sigma, mode="reflect", truncate=4.0)
        assert np.abs(ours[i, 0].numpy() - expected).max() < 1e-5


def test_gaussian_weights_follow_scipy_truncation():
    for sigma in (0.3, 1.0, 4.0, 7.7):
        w = ops.gaussian_weights(sigma)
        assert w.numel() == 2 * int(4 * sigma + 0.5) + 1
        assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert torch.equal(w, w.flip(0))


def test_reference_first_principles(gen):
    shapes = [(8, 8, 8), (4, 4, 4)]
    teacher, _ = make_pyramid(gen, 2, shapes)
    same = ops.anomaly_map_reference(teacher, teacher, (16, 16), sigma=0.0)
    assert same.abs().max() < 1e-6
    opposite = ops.anomaly_map_reference(teacher, [-t for t in teacher], (16, 16), reduce="sum", sigma=2.0)
    assert torch.allclose(opposite, torch.full_like(opposite, 4.0), atol=1e-5)  # 2 levels x (1 - (-1))
    scaled = ops.anomaly_map_reference(teacher, [3 * t for t in teacher], (16, 16), sigma=0.0)
    assert scaled.abs().max() < 1e-6  # cosine ignores scale


def test_reference_cosine_agrees_with_torch(gen):
    teacher, student = make_pyramid(gen, 3, [(10, 5, 6)])
    ours = anomaly_map_module.cosine_distance_reference(teacher[0], student[0])
    assert torch.allclose(ours, 1 - F.cosine_similarity(teacher[0], student[0], dim=1), atol=1e-6)


def _check_against_reference(backend, device, teacher, student, out_size, reduce, sigma):
    expected = ops.anomaly_map_reference([t.cpu() for t in teacher], [s.cpu() for s in student], out_size,
                                         reduce, sigma)
    with ops.use_backend(backend):
        got = ops.anomaly_map(teacher, student, out_size, reduce=reduce, sigma=sigma)
    assert got.shape == expected.shape and got.device.type == device
    assert got.dtype == (torch.float64 if teacher[0].dtype == torch.float64 else torch.float32)
    err = (got.cpu() - expected).abs().max().item()
    record_margin(err, TOLERANCE[teacher[0].dtype], str(teacher[0].dtype))
    assert err <= TOLERANCE[teacher[0].dtype], f"max abs error {err}"


@pytest.mark.parametrize("backend,device", backend_cases("anomaly_map"))
@pytest.mark.parametrize("shape_set", list(SHAPE_SETS))
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("reduce,sigma", [("sum", 4.0), ("mean", 1.5), ("mul", 0.0)])
def test_backend_matches_reference(gen, backend, device, shape_set, batch, reduce, sigma):
    shapes, out_size = SHAPE_SETS[shape_set]
    teacher, student = make_pyramid(gen, batch, shapes, device=device)
    _check_against_reference(backend, device, teacher, student, out_size, reduce, sigma)


@pytest.mark.parametrize("backend,device", backend_cases("anomaly_map"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "transposed"])
def test_backend_dtypes_and_layouts(gen, backend, device, dtype, layout):
    reason = anomaly_map_module.OP.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["odd"][0], dtype=dtype, layout=layout, device=device)
    _check_against_reference(backend, device, teacher, student, (23, 19), "sum", 4.0)


@pytest.mark.parametrize("backend,device", backend_cases("anomaly_map"))
def test_mixed_layouts_between_teacher_and_student(gen, backend, device):
    teacher, student = make_pyramid(gen, 3, SHAPE_SETS["pyramid"][0], device=device)
    student = [s.contiguous(memory_format=torch.channels_last) for s in student]
    _check_against_reference(backend, device, teacher, student, (30, 30), "mean", 2.0)


@pytest.mark.parametrize("backend,device", backend_cases("anomaly_map", reference_too=True))
def test_nan_propagates_without_crash(gen, backend, device):
    # level 0 is already at the output size: it is copied, not interpolated, so NaN must not leak sideways
    teacher, student = make_pyramid(gen, 2, [(8, 32, 32), (16, 16, 16), (32, 8, 8)], device=device)
    teacher[0][1, 0, 20, 3] = float("nan")
    teacher[1][1, 0, 2, 3] = float("nan")
    with ops.use_backend(backend):
        got = ops.anomaly_map(teacher, student, (32, 32), sigma=1.0).cpu()
    expected = ops.anomaly_map_reference([t.cpu() for t in teacher], [s.cpu() for s in student], (32, 32), sigma=1.0)
    assert torch.isfinite(got[0]).all()
    assert got[1].isnan().any()
    assert torch.equal(got.isnan(), expected.isnan())


def test_auto_picks_extension_on_cpu_when_loaded(gen):
    teacher, student = make_pyramid(gen, 1, [(4, 3, 3)])
    chosen = anomaly_map_module.OP.select(teacher + student)
    assert chosen == ("ext" if ops.backends()["ext"].available else "torch")


def test_inputs_that_need_gradients_use_the_differentiable_reference(gen):
    teacher, student = make_pyramid(gen, 1, [(4, 6, 6)])
    student[0].requires_grad_(True)
    out = ops.anomaly_map(teacher, student, (8, 8))
    out.sum().backward()
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0


def test_forced_backend_that_cannot_run_raises(gen):
    teacher, student = make_pyramid(gen, 1, [(4, 3, 3)], dtype=torch.float64)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.anomaly_map(teacher, student, (5, 5))


def test_backend_from_environment(gen, monkeypatch):
    teacher, student = make_pyramid(gen, 1, [(4, 3, 3)])
    monkeypatch.setenv("DMGRD_BACKEND", "torch")
    assert anomaly_map_module.OP.select(teacher + student) == "torch"
    with ops.use_backend("auto"):  # the context manager wins over the environment
        expected = "ext" if ops.backends()["ext"].available else "torch"
        assert anomaly_map_module.OP.select(teacher + student) == expected
    monkeypatch.setenv("DMGRD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DMGRD_BACKEND"):
        ops.anomaly_map(teacher, student, (5, 5))
    with pytest.raises(ValueError, match="backend"):
        ops.use_backend("fast").__enter__()


def test_empty_batch(gen):
    teacher, student = make_pyramid(gen, 1, [(4, 3, 3)])
    out = ops.anomaly_map([teacher[0][:0]], [student[0][:0]], (7, 9))
    assert out.shape == (0, 1, 7, 9)


def _bad_inputs(gen):
    t, s = make_pyramid(gen, 2, [(4, 8, 8), (8, 4, 4)])
    return [
        (([], []), "teacher_feats is empty"),
        ((t, s[:1]), "2 levels but student_feats has 1"),
        (([t[0][0]], [s[0][0]]), r"teacher_feats\[0\] must be 4-D"),
        ((t, [s[0][:1], s[1]]), "level 0: teacher batch 2 != student batch 1"),
        ((t, [s[0][:, :, :7], s[1]]), "level 0: teacher spatial size"),
        ((t, [s[0][:, :3], s[1]]), "level 0: teacher has 4 channels but student has 3"),
        (([t[0], t[1][:1]], [s[0], s[1][:1]]), "level 1 has batch 1 but level 0 has batch 2"),
        (([t[0].long()], [s[0].long()]), "must be floating point"),
        ((t[0], "student"), "student_feats must be a list"),
    ]


def test_bad_features_raise_value_error(gen):
    for (teacher, student), message in _bad_inputs(gen):
        with pytest.raises(ValueError, match=message):
            ops.anomaly_map(teacher, student, (16, 16))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"out_size": (0, 5)}, "out_size must be positive"),
        ({"out_size": "big"}, "out_size must be an int or a pair"),
        ({"reduce": "max"}, "reduce must be one of"),
        ({"sigma": -1.0}, "sigma must be a finite number"),
        ({"sigma": float("nan")}, "sigma must be a finite number"),
    ],
)
def test_bad_arguments_raise_value_error(gen, kwargs, message):
    t, s = make_pyramid(gen, 1, [(4, 8, 8)])
    args = {"out_size": (16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        ops.anomaly_map(t, s, **args)


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_opcheck(gen, device):
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["odd"][0], device=device)
    torch.library.opcheck(torch.ops.dmgrd.anomaly_map.default, (teacher, student, [9, 10], "sum", 1.0))


@needs_ext
def test_torch_compile_through_the_op(gen):
    teacher, student = make_pyramid(gen, 2, SHAPE_SETS["pyramid"][0])

    @torch.compile(fullgraph=FULLGRAPH_THROUGH_OPS)
    def score(t, s):
        return ops.image_score(ops.anomaly_map(t, s, (32, 32)), "topk_mean", k=10)

    expected = ops.image_score_reference(ops.anomaly_map_reference(teacher, student, (32, 32))[:, 0], "topk_mean", 10)
    assert torch.allclose(score(teacher, student), expected, atol=1e-5)
