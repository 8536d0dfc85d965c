"""dmgrd.ops.image_score: every backend against the torch reference, NaN handling, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import backend_cases, needs_ext, record_margin

from dmgrd import ops

image_score_module = importlib.import_module("dmgrd.ops.image_score")

# Relative to 1 + |reference|. Half scores are float32 means rounded once to their dtype; bfloat16 allows two units
# (2 eps) because the Triton interpreter rounds float32 -> bfloat16 toward zero (its cast passes no rounding mode),
# one unit below the reference's round-to-nearest in 26% of scores, up to all of eps |score|. Measured over 20
# seeds (tests/measure_margins.py): largest error 0.32 of the bound (float32, bfloat16), 0 (float16), 4e-4 (float64).
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def random_maps(gen, batch, height, width, dtype, kind):
    if kind == "ties":  # few distinct values: the k-th largest is shared by many pixels
        maps = torch.randint(0, 3, (batch, 1, height, width), generator=gen).to(torch.float64)
    elif kind == "signed":
        maps = torch.randn(batch, 1, height, width, generator=gen, dtype=torch.float64)
        maps[..., 0, 0] = -0.0
    else:
        maps = torch.rand(batch, 1, height, width, generator=gen, dtype=torch.float64)
    return maps.to(dtype)


@pytest.mark.parametrize("backend,device", backend_cases("image_score"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
@pytest.mark.parametrize("size,k", [((1, 1), 1), ((17, 23), 7), ((40, 40), 100), ((9, 11), 99)])
def test_backend_matches_reference(gen, backend, device, dtype, kind, size, k):
    reason = image_score_module.OP.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    maps = random_maps(gen, 3, *size, dtype, kind).to(device)
    for mode in ("max", "topk_mean"):
        expected = ops.image_score_reference(maps.cpu()[:, 0], mode, k)
        with ops.use_backend(backend):
            got = ops.image_score(maps, mode, k)
        assert got.dtype == dtype and got.shape == (3,) and got.device.type == device
        if mode == "max":
            assert torch.equal(got.cpu(), expected)
        else:
            got, expected = got.cpu().double(), expected.double()
            record_margin((got - expected).abs(), RTOL[dtype] * (1 + expected.abs()), str(dtype))
            assert torch.allclose(got, expected, rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("backend,device", backend_cases("image_score"))
def test_non_contiguous_maps(gen, backend, device):
    maps = torch.rand(4, 1, 31, 27, generator=gen).to(device).transpose(2, 3)
    assert not maps.is_contiguous()
    for mode in ("max", "topk_mean"):
        with ops.use_backend(backend):
            got = ops.image_score(maps, mode, 50)
        assert torch.allclose(got.cpu(), ops.image_score_reference(maps.cpu()[:, 0], mode, 50), rtol=1e-6)


@pytest.mark.parametrize("backend,device", backend_cases("image_score", reference_too=True))
def test_nan_scores_nan_for_that_image_only(gen, backend, device):
    maps = torch.rand(3, 1, 12, 12, generator=gen).to(device)
    maps[1, 0, 5, 7] = float("nan")
    for mode in ("max", "topk_mean"):
        with ops.use_backend(backend):
            got = ops.image_score(maps, mode, 5).cpu()
        assert got[1].isnan() and torch.isfinite(got[[0, 2]]).all()


def test_three_dimensional_maps_accepted(gen):
    maps = torch.rand(2, 8, 8, generator=gen)
    assert torch.equal(ops.image_score(maps), maps.flatten(1).amax(1))


def test_topk_mean_is_mean_of_largest(gen):
    maps = torch.rand(2, 1, 10, 10, generator=gen)
    expected = maps.flatten(1).sort(1, descending=True).values[:, :10].mean(1)
    assert torch.allclose(ops.image_score(maps, "topk_mean", 10), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "maps,kwargs,message",
    [
        (torch.rand(2, 2, 4, 4), {}, "must have one channel"),
        (torch.rand(4, 4), {}, r"must be \[B, 1, H, W\] or \[B, H, W\]"),
        (torch.rand(2, 1, 4, 4), {"mode": "topk_mean", "k": 17}, "k must be between 1 and the number of pixels"),
        (torch.rand(2, 1, 4, 4), {"mode": "topk_mean", "k": 0}, "k must be between 1"),
        (torch.rand(2, 1, 4, 4), {"mode": "median"}, "mode must be one of"),
        (torch.ones(2, 1, 4, 4, dtype=torch.long), {}, "must be floating point"),
        (torch.rand(2, 1, 0, 4), {}, "has no pixels"),
        ([1.0, 2.0], {}, "must be a tensor"),
    ],
)
def test_bad_input_raises_value_error(maps, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.image_score(maps, **kwargs)


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("mode", ["max", "topk_mean"])
def test_opcheck(gen, device, mode):
    maps = torch.rand(3, 9, 11, generator=gen).to(device)
    torch.library.opcheck(torch.ops.dmgrd.image_score.default, (maps, mode, 13))
