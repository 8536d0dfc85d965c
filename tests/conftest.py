"""Shared test helpers: fresh random seeds (printed on failure) and the backend/device cases to check."""

from __future__ import annotations

import os
import random

import pytest
import torch

from dmgrd.ops._dispatch import OPS


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator with a fresh seed per test (``DMGRD_TEST_SEED`` fixes it); the seed is in the report."""
    seed = int(os.environ.get("DMGRD_TEST_SEED", random.randrange(2**31)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def backend_cases(op_name: str, *, reference_too: bool = False) -> list:
    """pytest params (backend, device) for every fast path of ``op_name``, skipped with the reason it cannot run."""
    op = OPS[op_name]
    cases = []
    for device in ("cpu", "cuda"):
        for backend in ("ext", "triton") + (("torch",) if reference_too else ()):
            reason = op.unavailable_reason(backend, device)
            marks = [pytest.mark.skipif(reason is not None, reason=f"{backend} on {device}: {reason}")]
            cases.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return cases


def ext_loaded() -> bool:
    from dmgrd import _extension

    return _extension.loaded()


needs_ext = pytest.mark.skipif(not ext_loaded(), reason="dmgrd._C is not loaded (DMGRD_NO_EXT=1 install)")

# The op functions choose their backend by reading the ContextVar behind dmgrd.ops.use_backend; Dynamo traces
# ContextVar.get from torch 2.14 on, and older torch compiles them with a graph break there (fullgraph=True fails).
FULLGRAPH_THROUGH_OPS = torch.__version__ >= "2.14"
