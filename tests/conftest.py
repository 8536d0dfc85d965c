"""Shared test helpers: fresh random seeds (printed on failure), the backend/device cases to check, and the
record of how much of each tolerance a check used (``record_margin``, read by tests/measure_margins.py)."""

from __future__ import annotations

import json
import math
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
            marks = [pytest.mark.skipif(reason is not None, reason=f"{backend} on {device}: {reason}"),
                     *device_marks(backend, device)]
            cases.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return cases


def device_marks(backend: str, device: str) -> list:
    """The ``cuda`` and ``triton`` markers (``pytest -m "cuda or triton"``) of a (backend, device) case."""
    return [*([pytest.mark.cuda] if device == "cuda" else []), *([pytest.mark.triton] if backend == "triton" else [])]


def ext_loaded() -> bool:
    from dmgrd import _extension

    return _extension.loaded()


needs_ext = pytest.mark.skipif(not ext_loaded(), reason="dmgrd._C is not loaded (DMGRD_NO_EXT=1 install)")

# The op functions choose their backend by reading the ContextVar behind dmgrd.ops.use_backend; Dynamo traces
# ContextVar.get from torch 2.14 on, and older torch compiles them with a graph break there (fullgraph=True fails).
FULLGRAPH_THROUGH_OPS = torch.__version__ >= "2.14"


_margins: dict[tuple[str, str], dict] = {}  # (nodeid, label) -> the largest ratio of this session
_running: dict[str, pytest.Item] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    _running["item"] = item


def record_margin(observed: float | torch.Tensor, allowed: float | torch.Tensor, label: str = "") -> None:
    """Records ``observed / allowed`` (the share of a tolerance that a check used; for tensors the largest
    elementwise ratio, 0 / 0 counting as 0) for the running test under ``label`` (the tolerance's table entry, say
    "grad float16"), keeping the largest per test and label, with the seed of ``gen``; only when ``DMGRD_MARGINS``
    names the file that gets them as JSON lines at session end."""
    if not os.environ.get("DMGRD_MARGINS"):
        return
    observed, allowed = (torch.as_tensor(x, dtype=torch.float64).cpu() for x in (observed, allowed))
    ratios = torch.where(observed == 0, 0.0, observed / allowed)
    ratio = ratios.max().item() if ratios.numel() else 0.0
    item = _running["item"]
    label = label.replace("torch.", "")
    entry = _margins.setdefault((item.nodeid, label), {"test": item.nodeid, "label": label, "ratio": 0.0,
                                                       "seed": dict(item.user_properties).get("seed")})
    if math.isnan(ratio) or ratio > entry["ratio"]:  # a NaN stays: it is the worst
        entry["ratio"] = ratio


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("DMGRD_MARGINS")
    if path:
        with open(path, "a") as out:
            out.writelines(json.dumps(entry) + "\n" for entry in _margins.values())
