"""dmgrd.ops.coreset_update and greedy_coreset: every backend against the reference, ties, NaN, k-center bounds."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
from conftest import backend_cases, needs_ext, record_margin
from hypothesis import given, settings
from hypothesis import strategies as st

from dmgrd import ops
from dmgrd.numerics import accumulation_dtype
from dmgrd.ops._dispatch import triton_interpreted

coreset_module = importlib.import_module("dmgrd.ops.coreset_update")

# Every backend accumulates in float32 (float64) from the same upcast inputs; only the summation order differs.
# Measured over 20 seeds (tests/measure_margins.py): largest distance error 0.014 of the bound (float32, float16),
# 0.012 (bfloat16), 5e-4 (float64); the farthest point was always a maximum of the reference's distances.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
SHAPES = [(1, 1), (1, 9), (37, 5), (300, 129), (257, 64)]


def skip_unless_runs(backend: str, device: str, dtype: torch.dtype) -> None:
    reason = coreset_module.OP.unavailable_reason(backend, device, dtype)
    if reason is None and backend == "triton" and dtype == torch.bfloat16 and triton_interpreted():
        reason = "no bf16 arithmetic in the Triton interpreter"
    if reason:
        pytest.skip(reason)


def random_case(gen, rows, dim, dtype, first_step=False):
    points = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(dtype)
    center = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)
    acc = accumulation_dtype(dtype)
    if first_step:
        min_dist = torch.full((rows,), math.inf, dtype=acc)
    else:  # about half the points keep their old distance
        min_dist = (2 * dim * torch.rand(rows, generator=gen, dtype=torch.float64)).to(acc)
    return points, center, min_dist


def check_update(backend, points, center, min_dist, rtol):
    expected, _ = ops.coreset_update_reference(points.cpu(), center.cpu(), min_dist.cpu())
    with ops.use_backend(backend):
        got, farthest = ops.coreset_update(points, center, min_dist)
    assert got.dtype == min_dist.dtype and got.shape == min_dist.shape and got.device == points.device
    assert farthest.dtype == torch.long and farthest.shape == () and farthest.device == points.device
    got, farthest = got.cpu(), int(farthest)
    record_margin((got - expected).abs(), rtol * (1 + expected.abs()), f"distance {points.dtype}")
    assert torch.allclose(got, expected, rtol=rtol, atol=rtol), f"max abs error {(got - expected).abs().max()}"
    assert farthest == int(torch.argmax(got))  # the lowest index of the backend's own maximum
    record_margin(expected.max() - expected[farthest], 2 * rtol * expected.max(), f"farthest {points.dtype}")
    assert expected[farthest] >= expected.max() * (1 - 2 * rtol)  # and a maximum of the reference too


@pytest.mark.parametrize("backend,device", backend_cases("coreset_update"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{d}" for r, d in SHAPES])
@pytest.mark.parametrize("first_step", [True, False], ids=["inf", "finite"])
def test_backend_matches_reference(gen, backend, device, dtype, shape, first_step):
    skip_unless_runs(backend, device, dtype)
    points, center, min_dist = random_case(gen, *shape, dtype, first_step)
    check_update(backend, points.to(device), center.to(device), min_dist.to(device), RTOL[dtype])


@pytest.mark.parametrize("backend,device", backend_cases("coreset_update"))
def test_non_contiguous_inputs(gen, backend, device):
    big = torch.randn(2 * 41, 3 * 70, generator=gen)
    points = big.T[::3, ::2]  # [70, 41] with no unit stride
    center = torch.randn(41, 2, generator=gen)[:, 1]
    min_dist = (torch.rand(70, 2, generator=gen) * 80)[:, 0]
    assert not (points.is_contiguous() or center.is_contiguous() or min_dist.is_contiguous())
    check_update(backend, points.to(device), center.to(device), min_dist.to(device), RTOL[torch.float32])


@pytest.mark.parametrize("backend,device", backend_cases("coreset_update", reference_too=True))
def test_ties_resolve_to_the_lowest_index_exactly(gen, backend, device):
    # integer coordinates: every distance is exact, so every backend must equal the reference bit for bit
    points = torch.randint(-2, 3, (203, 7), generator=gen).float()
    points[[150, 30, 90]] = 9.0  # three farthest points, equal
    center = torch.zeros(7)
    min_dist = torch.full((203,), math.inf)
    min_dist[30] = 1.0  # an old, smaller distance removes 30 from the tie
    with ops.use_backend(backend):
        got, farthest = ops.coreset_update(points.to(device), center.to(device), min_dist.to(device))
    expected, expected_index = ops.coreset_update_reference(points, center, min_dist)
    assert torch.equal(got.cpu(), expected) and int(farthest) == int(expected_index) == 90
    signed_zeros = torch.where(torch.arange(70) % 2 == 0, -0.0, 0.0)  # -0.0 and +0.0 are equal: index 0
    zeros = torch.zeros(70, 3, device=device)
    with ops.use_backend(backend):
        _, farthest = ops.coreset_update(zeros, zeros[0], signed_zeros.to(device))
    assert int(farthest) == 0


@pytest.mark.parametrize("backend,device", backend_cases("coreset_update", reference_too=True))
def test_nan_propagates_and_is_farthest(gen, backend, device):
    points = torch.randn(90, 6, generator=gen)
    points[[70, 12], 2] = float("nan")
    min_dist = torch.rand(90, generator=gen)
    min_dist[40] = math.inf
    with ops.use_backend(backend):
        got, farthest = ops.coreset_update(points.to(device), torch.zeros(6, device=device), min_dist.to(device))
    assert int(farthest) == 12
    assert got.isnan().nonzero().flatten().tolist() == [12, 70]


@pytest.mark.parametrize("backend,device", backend_cases("coreset_update"))
def test_single_point(backend, device):
    with ops.use_backend(backend):
        got, farthest = ops.coreset_update(torch.tensor([[3.0, 4.0]], device=device),
                                           torch.zeros(2, device=device), torch.tensor([30.0], device=device))
    assert got.cpu().tolist() == [25.0] and int(farthest) == 0


def fuzz_backends() -> list[str]:
    return [b for b in ("ext", "triton") if coreset_module.OP.unavailable_reason(b, "cpu") is None]


@pytest.mark.skipif(not fuzz_backends(), reason="no CPU fast path here (extension not built, no TRITON_INTERPRET)")
@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 80), dim=st.integers(1, 70), half=st.booleans(), seed=st.integers(0, 2**31 - 1),
       first_step=st.booleans())
def test_fuzz_cpu_backends_against_reference(rows, dim, half, seed, first_step):
    dtype = torch.float16 if half else torch.float32
    points, center, min_dist = random_case(torch.Generator().manual_seed(seed), rows, dim, dtype, first_step)
    for backend in fuzz_backends():
        check_update(backend, points, center, min_dist, RTOL[dtype])


# -- greedy_coreset -------------------------------------------------------------------------------------------


def slow_greedy(points: list[list[float]], size: int, start: int) -> list[int]:
    """Plain-python greedy k-center: the farthest point (lowest index on ties) from those selected so far."""
    selected, nearest = [start], [math.inf] * len(points)
    while len(selected) < size:
        center = points[selected[-1]]
        for i, p in enumerate(points):
            nearest[i] = min(nearest[i], sum((a - b) ** 2 for a, b in zip(p, center, strict=True)))
        selected.append(max(range(len(points)), key=lambda i: (nearest[i], -i)))
    return selected


def covering_radius(points: torch.Tensor, centers) -> float:
    exact = "donot_use_mm_for_euclid_dist"
    return torch.cdist(points.double(), points[list(centers)].double(), compute_mode=exact).amin(1).max().item()


@pytest.mark.parametrize("backend,device", backend_cases("coreset_update", reference_too=True))
def test_greedy_coreset_matches_plain_python(gen, backend, device):
    points = torch.randint(-4, 5, (61, 5), generator=gen).float()  # exact distances, many ties
    for size, start in ((1, 0), (12, 0), (9, 33)):
        with ops.use_backend(backend):
            got = ops.greedy_coreset(points.to(device), size, start=start)
        assert got.dtype == torch.long and got.device.type == device
        assert got.tolist() == slow_greedy(points.tolist(), size, start)


@needs_ext
def test_greedy_coreset_float64_random_points(gen):
    points = torch.randn(150, 9, generator=gen, dtype=torch.float64)
    got = ops.greedy_coreset(points, 25, start=7)
    assert got.tolist() == slow_greedy(points.tolist(), 25, 7)
    assert len(set(got.tolist())) == 25


def test_greedy_coreset_is_a_two_approximation_of_k_center(gen):
    points = torch.randn(13, 2, generator=gen)
    for size in (2, 3, 4):
        optimum = min(covering_radius(points, c) for c in itertools.combinations(range(13), size))
        for start in range(13):
            greedy = covering_radius(points, ops.greedy_coreset(points, size, start=start).tolist())
            assert greedy <= 2 * optimum + 1e-9


def test_covering_radius_never_grows_and_reaches_zero(gen):
    points = torch.randn(40, 6, generator=gen)
    order = ops.greedy_coreset(points, 40, start=3).tolist()
    assert sorted(order) == list(range(40)) and order[0] == 3
    radii = [covering_radius(points, order[:k]) for k in range(1, 41)]
    assert all(b <= a for a, b in itertools.pairwise(radii)) and radii[-1] == 0
    assert ops.greedy_coreset(points, 10, start=3).tolist() == order[:10]  # a prefix of the longer run


def test_random_projection_is_seeded_and_used(gen):
    points = torch.randn(80, 300, generator=gen)
    first = ops.greedy_coreset(points, 15, projection_dim=16, generator=torch.Generator().manual_seed(4))
    again = ops.greedy_coreset(points, 15, projection_dim=16, generator=torch.Generator().manual_seed(4))
    projected = coreset_module.random_projection(points, 16, torch.Generator().manual_seed(4))
    assert projected.shape == (80, 16)
    assert torch.equal(first, again) and first.tolist() == ops.greedy_coreset(projected, 15).tolist()
    # Johnson-Lindenstrauss: pairwise distances survive 300 -> 200 dimensions within a modest factor
    wide = coreset_module.random_projection(points, 200, torch.Generator().manual_seed(5))
    ratio = torch.pdist(wide) / torch.pdist(points)
    assert ratio.min() > 0.6 and ratio.max() < 1.4  # 50 point seeds x 2 projection seeds: 0.76-1.23


def test_half_points_select_in_float32(gen):
    points = torch.randint(-3, 4, (50, 4), generator=gen).half()
    assert ops.greedy_coreset(points, 8).tolist() == slow_greedy(points.float().tolist(), 8, 0)


def _update_args(points=None, center=None, min_dist=None):
    points = torch.rand(5, 3) if points is None else points
    return (points, torch.rand(3) if center is None else center, torch.rand(5) if min_dist is None else min_dist)


@pytest.mark.parametrize(
    "args,message",
    [
        (_update_args(points=torch.rand(5)), r"points must be a 2-D tensor"),
        (_update_args(points=torch.ones(5, 3, dtype=torch.long)), "points must be floating point"),
        (_update_args(points=torch.rand(0, 3)), "at least one row"),
        (_update_args(center=torch.rand(4)), r"center must be a \[D\] = \[3\]"),
        (_update_args(center=torch.rand(3, dtype=torch.float64)), "center must share"),
        (_update_args(min_dist=torch.rand(4)), r"min_dist must be a \[N\] = \[5\]"),
        (_update_args(min_dist=torch.rand(5).half()), "min_dist must be torch.float32"),
        (_update_args(torch.rand(5, 3).double(), torch.rand(3).double()), "min_dist must be torch.float64"),
    ],
)
def test_coreset_update_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        ops.coreset_update(*args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size": 0}, "size must be an int between 1 and the number of points"),
        ({"size": 6}, "size must be"),
        ({"size": 2.0}, "size must be"),
        ({"size": 2, "start": 5}, r"start must be a point index in \[0, 5\)"),
        ({"size": 2, "start": -1}, "start must be"),
        ({"size": 2, "projection_dim": 0}, "projection_dim must be None or a positive int"),
    ],
)
def test_greedy_coreset_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.greedy_coreset(torch.rand(5, 3), **kwargs)


@needs_ext
def test_opcheck(gen):
    points, center, min_dist = random_case(gen, 33, 10, torch.float32)
    torch.library.opcheck(torch.ops.dmgrd.coreset_update.default, (points, center, min_dist))
