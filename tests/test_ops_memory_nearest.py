"""dmgrd.ops.memory_nearest: every backend against the torch reference, ties, NaN, layouts, bad input, fuzz.

Tolerances. Every backend accumulates in float32 (float64 for float64 inputs) from the same upcast inputs; only
the summation order differs. A distance may therefore differ from the reference by the accumulation tolerance
``8 u sqrt(D + 1) scale`` (u the accumulation unit roundoff; scale ``|q|^2 + |m|^2`` for l2, 1 for cosine) plus
two units of the output dtype (``2 eps |d|``): both round an accumulator to the output dtype, and accumulators a
rounding error apart can round to neighbouring values one unit apart, all of ``eps |d|`` at the bottom of a
binade (measured: 1 of 25600 float16 distances, 0.97 of a one-unit bound). A returned neighbour must be a true
j-th nearest item up to twice the accumulation tolerance (distances recomputed in float64), and its index must
equal the reference's wherever the true gaps to the neighbouring ranks exceed twice that tolerance. Ties are
exact (small integer inputs): then indices must match exactly. Measured over 20 seeds (tests/measure_margins.py):
largest distance error 0.29 of the bound (float32, float64), 0.34 (float16); a returned neighbour's true
distance at most 3e-10 of its bound.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import backend_cases, needs_ext, record_margin
from hypothesis import given, settings
from hypothesis import strategies as st

from dmgrd import ops
from dmgrd.ops._dispatch import triton_interpreted

memory_nearest_module = importlib.import_module("dmgrd.ops.memory_nearest")
pairwise_distance_reference = memory_nearest_module.pairwise_distance_reference

METRICS = ("l2", "cosine")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def skip_unless_runs(op, backend: str, device: str, dtype: torch.dtype) -> None:
    reason = op.unavailable_reason(backend, device, dtype)
    if reason is None and backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        reason = "no bf16 arithmetic under the Triton interpreter"
    if reason:
        pytest.skip(reason)


def random_inputs(gen, rows: int, items: int, depth: int, dtype: torch.dtype, kind: str = "normal"):
    """Query [rows, depth] and bank [items, depth]; some items lie close to some queries.

    ``"integers"`` (in [-2, 2]) make exact ties between different items likely; ``"dyadic"`` values
    (multiples of 1/8) keep every product and sum exact, so equal rows tie exactly under any summation order.
    """
    if kind == "integers":
        q = torch.randint(-2, 3, (rows, depth), generator=gen)
        b = torch.randint(-2, 3, (items, depth), generator=gen)
        return q.to(dtype), b.to(dtype)
    q = torch.randn(rows, depth, generator=gen, dtype=torch.float64)
    b = torch.randn(items, depth, generator=gen, dtype=torch.float64)
    b[: items // 2] += 0.5 * q[torch.arange(items // 2) % rows]
    if kind == "dyadic":
        q, b = (q * 8).round() / 8, (b * 8).round() / 8
    return q.to(dtype), b.to(dtype)


def distance_tolerance(query: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-query accumulation tolerance [N, 1] (see the module docstring)."""
    unit = 2.0**-53 if query.dtype == torch.float64 else 2.0**-24
    factor = 8 * unit * math.sqrt(query.shape[1] + 1)
    if metric == "cosine":
        return torch.full((query.shape[0], 1), factor, dtype=torch.float64)
    q, b = query.double().cpu(), bank.double().cpu()
    return factor * (q.square().sum(1, keepdim=True) + b.square().sum(1).max())


def assert_neighbours(query, bank, metric, got_dist, got_index, ref_dist, ref_index, exact_ties=False):
    """Checks a backend's (dist, index) [N, k] against the reference's with the tolerances above."""
    got_dist, got_index = got_dist.cpu(), got_index.cpu()
    assert got_dist.dtype == ref_dist.dtype and got_index.dtype == torch.long
    assert got_dist.shape == ref_dist.shape and got_index.shape == ref_index.shape
    tol = distance_tolerance(query, bank, metric)
    two_units = 2 * torch.finfo(got_dist.dtype).eps  # of the output dtype, relative (see the module docstring)
    diff = (got_dist.double() - ref_dist.double()).abs()
    allowed = tol + two_units * ref_dist.double().abs()
    same_nan = got_dist.isnan() == ref_dist.isnan()
    record_margin(diff.masked_fill(got_dist.isnan(), 0.0), allowed, f"distance {query.dtype}")
    assert same_nan.all() and (diff <= allowed).logical_or(got_dist.isnan()).all(), (diff - allowed).max()
    if exact_ties:
        assert torch.equal(got_index, ref_index)
        return
    k = got_index.shape[1]
    assert all(len(set(row.tolist())) == k for row in got_index), "a neighbour is repeated"
    truth = pairwise_distance_reference(query.double().cpu(), bank.double().cpu(), metric)
    ranked = truth.sort(dim=1).values
    record_margin((truth.gather(1, got_index) - ranked[:, :k]).abs(), 2 * tol, f"rank {query.dtype}")
    assert ((truth.gather(1, got_index) - ranked[:, :k]).abs() <= 2 * tol).all(), "not a true nearest item"
    padded = torch.cat([ranked[:, :1] - 1 - 4 * tol, ranked, ranked[:, -1:] + 1 + 4 * tol], dim=1)
    clear = (padded[:, 1:k + 1] - padded[:, :k] > 2 * tol) & (padded[:, 2:k + 2] - padded[:, 1:k + 1] > 2 * tol)
    assert torch.equal(got_index[clear], ref_index[clear])


def run_backend(backend, query, bank, k, metric):
    with ops.use_backend(backend):
        return ops.memory_nearest(query, bank, k, metric)


# (N, M, D, k): odd sizes, one query, one item, k = M, several tiles, and (small N and M, D >= 64) the
# Triton interpreter's split-D path.
SHAPES = [(1, 1, 1, 1), (7, 13, 5, 13), (37, 50, 19, 4), (70, 45, 40, 1), (5, 20, 100, 2)]


@pytest.mark.parametrize("backend,device", backend_cases("memory_nearest"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(gen, backend, device, dtype, shape):
    skip_unless_runs(memory_nearest_module.OP, backend, device, dtype)
    rows, items, depth, k = shape
    query, bank = random_inputs(gen, rows, items, depth, dtype)
    for metric in METRICS:
        ref = ops.memory_nearest_reference(query, bank, k, metric)
        got = run_backend(backend, query.to(device), bank.to(device), k, metric)
        assert got[0].device.type == device
        assert_neighbours(query, bank, metric, *got, *ref)


@pytest.mark.parametrize("backend,device", backend_cases("memory_nearest"))
def test_non_contiguous_inputs(gen, backend, device):
    query, bank = random_inputs(gen, 29, 41, 23, torch.float32)
    transposed = query.T.contiguous().T  # column-major query
    sliced = torch.randn(82, 30, generator=gen)[::2, 3:26]  # every other row, a window of columns
    sliced.copy_(bank)
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    for metric in METRICS:
        ref = ops.memory_nearest_reference(query, bank, 3, metric)
        got = run_backend(backend, transposed.to(device), sliced.to(device), 3, metric)
        assert_neighbours(query, bank, metric, *got, *ref)


@pytest.mark.parametrize("backend,device", backend_cases("memory_nearest", reference_too=True))
def test_ties_go_to_the_lowest_index(gen, backend, device):
    query, base = random_inputs(gen, 19, 6, 7, torch.float32, "dyadic")
    copy_of = torch.cat([torch.arange(6), torch.arange(6), torch.arange(3), torch.arange(6)])
    bank = base[copy_of]  # every item repeated at increasing indices: exact ties
    for metric in METRICS:
        _, ref_index = ops.memory_nearest_reference(query, bank, 5, metric)
        dist, index = run_backend(backend, query.to(device), bank.to(device), 5, metric)
        assert torch.equal(index.cpu(), ref_index)
        # Ranking the bank by the distances to the 6 distinct items, ties broken by bank index, gives the order;
        # distinct items may tie too (dyadic values), so this is not simply "first copy, then second copy".
        by_copy = pairwise_distance_reference(query, base, metric)[:, copy_of]
        assert torch.equal(index.cpu(), torch.sort(by_copy, dim=1, stable=True).indices[:, :5])
        assert torch.equal(dist[:, 0], dist[:, 1])  # the nearest item has a second copy


@pytest.mark.parametrize("backend,device", backend_cases("memory_nearest"))
def test_integer_inputs_give_the_reference_exactly(gen, backend, device):
    query, bank = random_inputs(gen, 33, 40, 6, torch.float32, "integers")
    ref = ops.memory_nearest_reference(query, bank, 7, "l2")
    got = run_backend(backend, query.to(device), bank.to(device), 7, "l2")
    assert_neighbours(query, bank, "l2", *got, *ref, exact_ties=True)


@pytest.mark.parametrize("backend,device", backend_cases("memory_nearest"))
def test_nan_ranks_last(gen, backend, device):
    query, bank = random_inputs(gen, 6, 9, 5, torch.float32)
    query[2, 1] = float("nan")  # every distance of this query is NaN: indices 0, 1, 2
    bank[4, 0] = float("nan")  # this item ranks after every other
    ref_dist, ref_index = ops.memory_nearest_reference(query, bank, 9, "l2")
    dist, index = run_backend(backend, query.to(device), bank.to(device), 9, "l2")
    assert torch.equal(index.cpu(), ref_index)
    assert torch.equal(dist.cpu().isnan(), ref_dist.isnan())
    assert index[2].tolist() == list(range(9)) and (index[[0, 1, 3, 4, 5], -1] == 4).all()


@needs_ext
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(3, 2500, 8, 3), (600, 1500, 12, 2), (4, 6, 40000, 2)], ids=str)
def test_cpu_kernel_paths(gen, metric, shape):
    """Bank split over threads and merged, several query blocks and tiles, and the split-D path (huge D)."""
    rows, items, depth, k = shape
    query, bank = random_inputs(gen, rows, items, depth, torch.float32)
    ref = ops.memory_nearest_reference(query, bank, k, metric)
    got = run_backend("ext", query, bank, k, metric)
    assert_neighbours(query, bank, metric, *got, *ref)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_backend("ext", query, bank, k, metric)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], got[0]) and torch.equal(single[1], got[1]), "depends on the thread count"


def test_empty_query():
    dist, index = ops.memory_nearest(torch.empty(0, 4), torch.ones(3, 4), 2)
    assert dist.shape == (0, 2) and index.shape == (0, 2) and index.dtype == torch.long


def test_grad_inputs_run_the_reference(gen):
    query, bank = random_inputs(gen, 5, 7, 3, torch.float32)
    query.requires_grad_(True)
    assert memory_nearest_module.OP.select([query, bank]) == "torch"
    dist, _ = ops.memory_nearest(query, bank, 2)
    dist.sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_large_k_on_gpu_kernels_goes_to_the_reference_or_raises_when_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(memory_nearest_module, "memory_nearest_reference", lambda *a: calls.append(a) or "ref")
    query, bank, k = torch.zeros(2, 3), torch.zeros(20, 3), memory_nearest_module.FAST_K_MAX + 1
    triton_impl = memory_nearest_module.OP.implementation("triton")
    with ops.use_backend("auto"):
        assert triton_impl(query, bank, k, "l2") == "ref" and len(calls) == 1
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="k=17 is above the 16"):
        triton_impl(query, bank, k, "l2")


@pytest.mark.parametrize(
    "query,bank,kwargs,message",
    [
        (torch.ones(4), torch.ones(3, 4), {}, r"query must be a 2-D tensor"),
        (torch.ones(2, 4), torch.ones(3, 4, 1), {}, r"bank must be a 2-D tensor"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), {}, "query must be floating point"),
        (torch.ones(2, 4), torch.ones(3, 5), {}, "same feature size D"),
        (torch.ones(2, 4), torch.ones(0, 4), {}, "has no memory items"),
        (torch.ones(2, 4), torch.ones(3, 4, dtype=torch.float64), {}, "must share device and dtype"),
        (torch.ones(2, 4), torch.ones(3, 4), {"k": 0}, "k must be between 1 and the number of memory items"),
        (torch.ones(2, 4), torch.ones(3, 4), {"k": 4}, r"k must be between 1 and the number of memory items \(3\)"),
        (torch.ones(2, 4), torch.ones(3, 4), {"metric": "l1"}, "metric must be one of"),
        ([[1.0]], torch.ones(3, 1), {}, "query must be a 2-D tensor"),
    ],
)
def test_bad_input_raises_value_error(query, bank, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.memory_nearest(query, bank, **kwargs)


@needs_ext
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(gen, metric):
    query, bank = random_inputs(gen, 9, 11, 5, torch.float32)
    torch.library.opcheck(torch.ops.dmgrd.memory_nearest.default, (query, bank, 3, metric))


def fuzz_case(seed, rows, items, depth, k, metric, integers, dtype, backend, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    query, bank = random_inputs(gen, rows, items, depth, dtype, "integers" if integers else "normal")
    k = min(k, items)
    ref = ops.memory_nearest_reference(query, bank, k, metric)
    got = run_backend(backend, query.to(device), bank.to(device), k, metric)
    assert_neighbours(query, bank, metric, *got, *ref, exact_ties=integers and metric == "l2")


@needs_ext
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 70), items=st.integers(1, 90), depth=st.integers(0, 40),
       k=st.integers(1, 24), metric=st.sampled_from(METRICS), integers=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))
def test_fuzz_ext(seed, rows, items, depth, k, metric, integers, dtype):
    fuzz_case(seed, rows, items, depth, k, metric, integers, dtype, "ext")


# The interpreter runs each kernel call in Python (~0.1 s for tiny shapes): fewer examples keep the file fast.
@pytest.mark.skipif(not triton_interpreted(), reason="the Triton fuzz runs under TRITON_INTERPRET=1")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), items=st.integers(1, 40), depth=st.integers(0, 70),
       k=st.integers(1, 16), metric=st.sampled_from(METRICS), integers=st.booleans())
def test_fuzz_triton(seed, rows, items, depth, k, metric, integers):
    fuzz_case(seed, rows, items, depth, k, metric, integers, torch.float32, "triton")
