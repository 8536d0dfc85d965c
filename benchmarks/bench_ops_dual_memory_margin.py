"""dual_memory_margin per backend at the memory_nearest benchmark's two shapes (bench_ops_memory_nearest.py), with
the memory split into a normal and an abnormal bank: patch level two banks of 8192 patches, image level two
banks of 30 images."""

from __future__ import annotations

import pytest
from bench_ops_memory_nearest import SHAPES, inputs, record, rounds_for, timed
from conftest import backend_device_cases

from dmgrd import ops


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", backend_device_cases("dual_memory_margin"))
def test_dual_memory_margin(benchmark, backend, device, shape):
    query, (normal, abnormal) = inputs(shape, device, banks=2)
    benchmark.group = f"dual_memory_margin {shape} {device}"
    with ops.use_backend(backend):
        timed(benchmark, lambda: ops.dual_memory_margin(query, normal, abnormal, 1.0, "l2"), device,
              rounds_for(backend, shape))
    record(benchmark, shape, query, [normal, abnormal])
