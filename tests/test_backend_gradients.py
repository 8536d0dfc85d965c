"""No silent wrong gradient: one training step of every method under each forced backend.

A forced backend (``use_backend`` or ``DMGRD_BACKEND``) computes the torch references' gradients, or raises,
naming the op and the backend, when an op without a backward meets inputs that need gradients (DRD's
segmentation loss runs ``anomaly_map`` on the student's features).

Two views of the same step. In float64 the whole step's parameter gradients under the extension equal the
torch backend's to rounding: in float32 they cannot be compared tightly, because a 1e-7 difference in one
op's forward is amplified up to 1e-2 by the rest of a step (measured: DM-GRD with patch memory, 3 of 80
seed-backend pairs; each op alone agreed to 2e-6). Triton takes no float64, so for each backend every
gradient-carrying op call of a float32 step is replayed on its own, on the step's own inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dmgrd
from dmgrd import ops
from dmgrd.ops import BackendUnavailableError
from dmgrd.ops._dispatch import OPS, Op

LITE0 = "efficientnet_lite0"
SIZE = 64
METHODS = {
    "rd4ad": lambda: dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE),
    "rdpp": lambda: dmgrd.RDPP(LITE0, weights=None, image_size=SIZE, ssot_points=32),
    "dmgrd": lambda: dmgrd.DMGRD(LITE0, weights=None, image_size=SIZE, memory_size=3, texture_count=4,
                                 ssot_points=32),
    "dmgrd-patch": lambda: dmgrd.DMGRD(LITE0, weights=None, image_size=SIZE, memory_size=3, texture_count=4,
                                       ssot_points=32, memory="patch", triplet="memory"),
    "memkd": lambda: dmgrd.MemKD(LITE0, weights=None, image_size=SIZE, exemplars=3, memory_items=16),
    "drd": lambda: dmgrd.DRD(LITE0, weights=None, image_size=SIZE),
}
# Methods whose training step calls an op without a backward on inputs that need gradients.
NO_BACKWARD = {"drd": "anomaly_map"}
# Whole float64 step, ext against torch: largest |g_ext - g_torch| / max(|g_torch|, 1e-4 max_p |g_p|) over the
# parameters, measured over 5 seeds per method: 6.9e-13 (RD++; 4.1e-14 DM-GRD patch memory, <= 8.4e-15 the
# others). The bound leaves a margin of 1000 and is still 10^4 below float32 rounding.
FLOAT64_TOLERANCE = 1e-9
# One op call replayed in float32: |g_backend - g_torch| / |g_torch| per input, measured over 5 seeds of every
# method: ext 1.7e-6 (memory_readout; cosine_kd_loss 8.8e-7), triton 1.5e-6 (memory_readout; cosine_kd_loss
# 1.0e-6). The bound leaves a margin of 60.
FLOAT32_TOLERANCE = 1e-4


def backend_cases(dtype: torch.dtype) -> list:
    """The forced backends to check, skipped where one cannot run every op it has on CPU ``dtype`` tensors."""
    cases = []
    for backend in ("ext", "triton"):
        reasons = {op.unavailable_reason(backend, "cpu", dtype) for op in OPS.values()}
        reasons -= {None, "no extension kernel for this op", "no Triton kernel for this op"}
        reason = next(iter(sorted(reasons)), None)
        cases.append(pytest.param(backend, id=backend,
                                  marks=pytest.mark.skipif(reason is not None, reason=f"{backend}: {reason}")))
    return cases


def prepared(method: str, seed: int, dtype: torch.dtype = torch.float32) -> dmgrd.models.AnomalyModel:
    """A fresh model of ``method`` with its data-built state (memory banks, exemplars) ready for training."""
    torch.manual_seed(seed)
    model = METHODS[method]().to(dtype)
    gen = torch.Generator().manual_seed(seed)
    data = [{"image": torch.rand(3, SIZE, SIZE, generator=gen, dtype=dtype)} for _ in range(4)]
    with ops.use_backend("torch"):
        model.train().prepare(data, torch.Generator().manual_seed(seed), batch_size=2)
    return model


def training_step(model, backend: str, seed: int) -> dict[str, torch.Tensor]:
    """The parameter gradients of one training step of a copy of ``model`` under the forced ``backend``."""
    model = copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    with ops.use_backend(backend):
        losses = model.training_losses(images, torch.Generator().manual_seed(seed + 2))
        losses["loss"].backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def seed_of(gen) -> int:
    return int(torch.randint(2**31, (1,), generator=gen))


@pytest.mark.parametrize("backend", backend_cases(torch.float64))
@pytest.mark.parametrize("method", list(METHODS))
def test_a_float64_training_step_has_the_torch_gradients_or_raises(gen, method, backend):
    seed = seed_of(gen)
    model = prepared(method, seed, torch.float64)
    if method in NO_BACKWARD:
        with pytest.raises(BackendUnavailableError, match=rf"{NO_BACKWARD[method]}: backend '{backend}'.*no backward"):
            training_step(model, backend, seed)
        return
    expected, got = training_step(model, "torch", seed), training_step(model, backend, seed)
    assert got.keys() == expected.keys() and len(expected) > 10
    scale = max(float(g.norm()) for g in expected.values())
    for name, grad in expected.items():
        error = float((got[name] - grad).norm()) / max(float(grad.norm()), 1e-4 * scale)
        assert error <= FLOAT64_TOLERANCE, f"{name}: gradient error {error:.2e} under {backend}"


def recorded_calls(model, seed: int, monkeypatch) -> list[tuple[Op, tuple]]:
    """Every op call of one float32 training step on the torch backend whose inputs need gradients."""
    calls = []
    original = Op.__call__

    def record(op, tensors, *args):
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            calls.append((op, tuple(_detached(a) for a in args)))
        return original(op, tensors, *args)

    monkeypatch.setattr(Op, "__call__", record)
    training_step(model, "torch", seed)
    monkeypatch.setattr(Op, "__call__", original)
    return calls


def _detached(arg):
    if isinstance(arg, torch.Tensor):
        return arg.detach().clone().requires_grad_(arg.requires_grad)
    if isinstance(arg, list | tuple):
        return type(arg)(_detached(a) for a in arg)
    return arg


def _leaves(args) -> list[torch.Tensor]:
    flat = []
    for a in args:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, list | tuple):
            flat += _leaves(a)
    return [t for t in flat if t.requires_grad]


def _outputs(out) -> list[torch.Tensor]:
    out = list(out) if isinstance(out, list | tuple) else [out]
    return [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]


def replayed_gradients(op: Op, args: tuple, backend: str) -> list[torch.Tensor]:
    args = _detached(args)
    with ops.use_backend(backend):
        outputs = _outputs(op(_leaves(args), *args))
    upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
                for i, o in enumerate(outputs)]
    return list(torch.autograd.grad(outputs, _leaves(args), upstream, allow_unused=True))


@pytest.mark.parametrize("backend", backend_cases(torch.float32))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_op_call_of_a_training_step_has_the_torch_gradients_or_raises(gen, method, backend, monkeypatch):
    seed = seed_of(gen)
    calls = recorded_calls(prepared(method, seed), seed, monkeypatch)
    assert calls, "the training step called no op with gradients"
    checked = set()
    for op, args in calls:
        if op.unavailable_reason(backend, "cpu", torch.float32) is not None:
            continue  # not an op of this backend: the forced backend would raise BackendUnavailableError
        checked.add(op.name)
        if not op.differentiable:
            assert method in NO_BACKWARD and op.name == NO_BACKWARD[method]
            with pytest.raises(BackendUnavailableError, match=rf"{op.name}: backend '{backend}'.*no backward"):
                replayed_gradients(op, args, backend)
            continue
        expected, got = replayed_gradients(op, args, "torch"), replayed_gradients(op, args, backend)
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            if want is None:
                assert have is None or not have.any(), f"{op.name} input {i}: a gradient where torch has none"
                continue
            error = float((have - want).norm() / want.norm().clamp_min(1e-30))
            assert error <= FLOAT32_TOLERANCE, f"{op.name} input {i}: gradient error {error:.2e} under {backend}"
    assert "cosine_kd_loss" in checked


def test_the_environment_variable_forces_the_same_check(monkeypatch):
    teacher = [torch.randn(2, 4, 8, 8)]
    student = [torch.randn(2, 4, 8, 8, requires_grad=True)]
    monkeypatch.setenv("DMGRD_BACKEND", "torch")
    assert OPS["anomaly_map"].select(teacher + student) == "torch"
    for backend in ("ext", "triton"):
        monkeypatch.setenv("DMGRD_BACKEND", backend)
        runs = OPS["anomaly_map"].unavailable_reason(backend, "cpu", torch.float32) is None
        with pytest.raises(BackendUnavailableError, match=f"anomaly_map: backend '{backend}'.*"
                                                          f"{'no backward' if runs else ''}"):
            ops.anomaly_map(teacher, student, 16)


def test_auto_sends_inputs_that_need_gradients_to_the_reference():
    teacher = [torch.randn(2, 4, 8, 8)]
    student = [torch.randn(2, 4, 8, 8, requires_grad=True)]
    assert OPS["anomaly_map"].select(teacher + student) == "torch"
    ops.anomaly_map(teacher, student, 16).sum().backward()
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0
