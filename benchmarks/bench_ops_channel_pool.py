"""channel_pool per backend at MSFF's real shapes: the three inputs MI_l (2 C_l channels) of a batch of 8 256²
images (the whole attention, with fuse_pyramid: bench_ops_fuse_pyramid.py)."""

from __future__ import annotations

import pytest
from bench_ops_fuse_pyramid import TEACHERS, make_inputs, nbytes, timed_run
from conftest import backend_device_cases

from dmgrd import ops


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("backend,device", backend_device_cases("channel_pool"))
def test_channel_pool(benchmark, backend, device, teacher):
    inputs, _, _ = make_inputs(teacher, device, requires_grad=False)
    timed_run(benchmark, backend, device, lambda: [ops.channel_pool(x) for x in inputs], nbytes(inputs),
         f"channel_pool {device} {teacher}")
