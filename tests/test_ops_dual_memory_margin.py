"""dmgrd.ops.dual_memory_margin: every backend against the torch reference (values and gradients), ties,
layouts, bad input, fuzz.

Tolerances are those of test_ops_memory_nearest (the search is the same): a distance within the accumulation
tolerance of the reference's plus two units of the output dtype, indices equal wherever the nearest item is
clear by twice the tolerance, the hinge within the sum of both distances' tolerances. Query gradients of the
fast backends match the reference's autograd to 1e-4 relative in float32 (1e-9 in float64), where the two
paths differ only by the order of float32 operations. Measured over 20 seeds (tests/measure_margins.py): largest
distance error 0.29 of the bound (float32, float64), 0.49 (float16); hinge error 0.14 (float32), 0.15 (float16),
0.23 (float64).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import backend_cases, needs_ext, record_margin
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_memory_nearest import (
    METRICS,
    assert_neighbours,
    distance_tolerance,
    random_inputs,
    skip_unless_runs,
)

from dmgrd import ops
from dmgrd.ops._dispatch import triton_interpreted

dual_module = importlib.import_module("dmgrd.ops.dual_memory_margin")
OP = dual_module.OP


def random_banks(gen, rows, normal, abnormal, depth, dtype, kind="normal"):
    query, normal_bank = random_inputs(gen, rows, normal, depth, dtype, kind)
    _, abnormal_bank = random_inputs(gen, rows, abnormal, depth, dtype, kind)
    return query, normal_bank, abnormal_bank


def run_backend(backend, query, normal_bank, abnormal_bank, margin, metric):
    with ops.use_backend(backend):
        return ops.dual_memory_margin(query, normal_bank, abnormal_bank, margin, metric)


def assert_matches_reference(query, normal_bank, abnormal_bank, margin, metric, got, exact_ties=False):
    ref = ops.dual_memory_margin_reference(query, normal_bank, abnormal_bank, margin, metric)
    got = [t.detach().cpu() for t in got]
    for bank, dist, index, ref_dist, ref_index in ((normal_bank, got[0], got[2], ref[0], ref[2]),
                                                   (abnormal_bank, got[1], got[3], ref[1], ref[3])):
        assert_neighbours(query, bank, metric, dist[:, None], index[:, None], ref_dist.detach()[:, None],
                          ref_index[:, None], exact_ties)
    tol = (distance_tolerance(query, normal_bank, metric) + distance_tolerance(query, abnormal_bank, metric))[:, 0]
    hinge, ref_hinge = got[4].double(), ref[4].detach().double()
    assert got[4].dtype == query.dtype
    allowed = tol + torch.finfo(query.dtype).eps * (2 * ref_hinge.abs() + margin)
    record_margin((hinge - ref_hinge).abs(), allowed, f"hinge {query.dtype}")
    assert ((hinge - ref_hinge).abs() <= allowed).all()


# (N, M_normal, M_abnormal, D): odd sizes, one query, one item per bank, banks of different sizes, several
# tiles, and (small N and M, D >= 64) the Triton interpreter's split-D path.
SHAPES = [(1, 1, 1, 1), (9, 23, 7, 20), (45, 37, 50, 33), (4, 9, 12, 90)]


@pytest.mark.parametrize("backend,device", backend_cases("dual_memory_margin"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(gen, backend, device, dtype, shape):
    skip_unless_runs(OP, backend, device, dtype)
    rows, normal, abnormal, depth = shape
    query, normal_bank, abnormal_bank = random_banks(gen, rows, normal, abnormal, depth, dtype)
    for metric, margin in (("l2", 2.0), ("cosine", 0.1)):
        got = run_backend(backend, query.to(device), normal_bank.to(device), abnormal_bank.to(device), margin, metric)
        assert all(t.device.type == device and t.shape == (rows,) for t in got)
        assert_matches_reference(query, normal_bank, abnormal_bank, margin, metric, got)


@pytest.mark.parametrize("backend,device", backend_cases("dual_memory_margin"))
def test_non_contiguous_inputs(gen, backend, device):
    query, normal_bank, abnormal_bank = random_banks(gen, 21, 17, 30, 13, torch.float32)
    transposed = query.T.contiguous().T
    sliced = torch.zeros(34, 20)[::2, 5:18]
    sliced.copy_(normal_bank)
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    for metric in METRICS:
        got = run_backend(backend, transposed.to(device), sliced.to(device), abnormal_bank.to(device), 0.5, metric)
        assert_matches_reference(query, normal_bank, abnormal_bank, 0.5, metric, got)


@pytest.mark.parametrize("backend,device", backend_cases("dual_memory_margin", reference_too=True))
def test_ties_go_to_the_lowest_index(gen, backend, device):
    query, normal_base, abnormal_base = random_banks(gen, 15, 5, 4, 6, torch.float32, "dyadic")
    normal_bank = torch.cat([normal_base, normal_base])
    abnormal_bank = torch.cat([abnormal_base, abnormal_base[:2], abnormal_base])
    for metric in METRICS:
        got = run_backend(backend, query.to(device), normal_bank.to(device), abnormal_bank.to(device), 1.0, metric)
        full_n = ops.memory_nearest_reference(query, normal_base, 1, metric)[1][:, 0]
        full_a = ops.memory_nearest_reference(query, abnormal_base, 1, metric)[1][:, 0]
        assert torch.equal(got[2].cpu(), full_n) and torch.equal(got[3].cpu(), full_a)  # the first copies
        assert_matches_reference(query, normal_bank, abnormal_bank, 1.0, metric, got, exact_ties=True)


def loss_of(outputs, weights):
    d_n, d_a, _, _, hinge = outputs
    return (weights[0] * d_n + weights[1] * d_a + weights[2] * hinge).sum()


def gradients(backend, query, normal_bank, abnormal_bank, margin, metric, weights, banks_too=False):
    leaves = [query.detach().clone().requires_grad_(True)]
    banks = [normal_bank.detach().clone(), abnormal_bank.detach().clone()]
    if banks_too:
        leaves += [b.requires_grad_(True) for b in banks]
    loss_of(run_backend(backend, leaves[0], *banks, margin, metric), weights).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("metric", METRICS)
def test_reference_gradcheck(gen, metric):
    query, normal_bank, abnormal_bank = random_banks(gen, 6, 5, 7, 4, torch.float64)
    leaves = [t.requires_grad_(True) for t in (query, normal_bank, abnormal_bank)]

    def outputs(q, n, a):
        d_n, d_a, _, _, hinge = ops.dual_memory_margin_reference(q, n, a, 1.5, metric)
        return d_n, d_a, hinge

    assert torch.autograd.gradcheck(outputs, leaves)


@needs_ext
@pytest.mark.parametrize("metric", METRICS)
def test_ext_gradcheck(gen, metric):
    query, normal_bank, abnormal_bank = random_banks(gen, 6, 5, 7, 4, torch.float64)
    leaves = [t.requires_grad_(True) for t in (query, normal_bank, abnormal_bank)]

    def outputs(q, n, a):
        d_n, d_a, _, _, hinge = run_backend("ext", q, n, a, 1.5, metric)
        return d_n, d_a, hinge

    assert torch.autograd.gradcheck(outputs, leaves)


@pytest.mark.parametrize("backend,device", backend_cases("dual_memory_margin"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_reference(gen, backend, device, dtype):
    skip_unless_runs(OP, backend, device, dtype)
    query, normal_bank, abnormal_bank = random_banks(gen, 33, 19, 25, 17, dtype)
    weights = torch.randn(3, generator=gen).tolist()
    tol = 1e-4 if dtype == torch.float32 else 1e-9  # measured over 20 seeds: 0.0026 of 1e-4, 4.5e-7 of 1e-9
    for metric, margin in (("l2", 10.0), ("cosine", 0.3)):  # margins that leave the hinge active on some rows
        expected = gradients("torch", query, normal_bank, abnormal_bank, margin, metric, weights, banks_too=True)
        got = gradients(backend, query.to(device), normal_bank.to(device), abnormal_bank.to(device), margin, metric,
                        weights, banks_too=True)
        for g, e in zip(got, expected, strict=True):
            scale = e.abs().max()
            record_margin((g.cpu() - e).abs().max().item(), tol * scale.item(), f"grad {dtype}")
            assert scale > 0 and ((g.cpu() - e).abs() <= tol * scale).all()


@needs_ext
def test_grad_inputs_use_the_fast_path(gen):
    query, normal_bank, abnormal_bank = random_banks(gen, 5, 4, 3, 6, torch.float32)
    query.requires_grad_(True)
    assert OP.select([query, normal_bank, abnormal_bank]) == "ext"
    hinge = ops.dual_memory_margin(query, normal_bank, abnormal_bank, 100.0)[4]
    assert "DualMemoryMargin" in type(hinge.grad_fn).__name__
    hinge.sum().backward()
    assert query.grad.abs().sum() > 0


def test_empty_query():
    outputs = ops.dual_memory_margin(torch.empty(0, 3), torch.ones(2, 3), torch.ones(4, 3))
    assert [t.shape for t in outputs] == [(0,)] * 5 and outputs[2].dtype == torch.long


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 5)), {}, "query and abnormal_bank must have the same"),
        ((torch.ones(2, 4), torch.ones(0, 4), torch.ones(3, 4)), {}, "normal_bank has no memory items"),
        ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4, 1)), {}, "abnormal_bank must be a 2-D tensor"),
        ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4).double()), {}, "must share device and dtype"),
        ((torch.ones(4), torch.ones(3, 4), torch.ones(3, 4)), {}, "query must be a 2-D tensor"),
        ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4)), {"margin": -1.0}, "margin must be >= 0"),
        ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4)), {"margin": float("nan")}, "margin must be >= 0"),
        ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4)), {"metric": "dot"}, "metric must be one of"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.dual_memory_margin(*args, **kwargs)


@needs_ext
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(gen, metric):
    query, normal_bank, abnormal_bank = random_banks(gen, 7, 5, 9, 6, torch.float32)
    torch.library.opcheck(torch.ops.dmgrd.dual_memory_margin.default, (query, normal_bank, abnormal_bank, 0.5, metric))


def fuzz_case(seed, rows, normal, abnormal, depth, metric, margin, integers, dtype, backend):
    gen = torch.Generator().manual_seed(seed)
    query, normal_bank, abnormal_bank = random_banks(gen, rows, normal, abnormal, depth, dtype,
                                                     "integers" if integers else "normal")
    got = run_backend(backend, query, normal_bank, abnormal_bank, margin, metric)
    assert_matches_reference(query, normal_bank, abnormal_bank, margin, metric, got,
                             exact_ties=integers and metric == "l2")


@needs_ext
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 70), normal=st.integers(1, 60),
       abnormal=st.integers(1, 60), depth=st.integers(0, 40), metric=st.sampled_from(METRICS),
       margin=st.floats(0, 4), integers=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fuzz_ext(seed, rows, normal, abnormal, depth, metric, margin, integers, dtype):
    fuzz_case(seed, rows, normal, abnormal, depth, metric, margin, integers, dtype, "ext")


# The interpreter runs each kernel call in Python (~0.1 s for tiny shapes): fewer examples keep the file fast.
@pytest.mark.skipif(not triton_interpreted(), reason="the Triton fuzz runs under TRITON_INTERPRET=1")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), normal=st.integers(1, 40),
       abnormal=st.integers(1, 40), depth=st.integers(0, 70), metric=st.sampled_from(METRICS),
       margin=st.floats(0, 4), integers=st.booleans())
def test_fuzz_triton(seed, rows, normal, abnormal, depth, metric, margin, integers):
    fuzz_case(seed, rows, normal, abnormal, depth, metric, margin, integers, torch.float32, "triton")
