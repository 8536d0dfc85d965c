"""Backend choice for the hot-path ops: C++/CUDA extension (``ext``), Triton (``triton``) or pure torch.

Every op has a pure-torch reference that defines it. For each call the backend is chosen by the inputs'
device: CUDA tensors use the fastest available of the extension and Triton, CPU tensors the C++ kernels,
and anything else the reference. Inputs that need gradients go to the reference unless the op's fast
paths implement backward (``Op.differentiable``). ``DMGRD_BACKEND`` or
:func:`use_backend` force one backend; a forced backend that cannot run the call (not built, wrong device
or dtype, or no backward for inputs that need gradients) raises :class:`BackendUnavailableError` rather than
silently falling back or dropping a gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from dmgrd import _extension
from dmgrd._extension import triton_interpreted

BACKENDS = ("ext", "triton", "torch")
CHOICES = ("auto", *BACKENDS)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dmgrd_backend", default=None)
OPS: dict[str, Op] = {}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (not built, wrong device or dtype)."""


def _check_choice(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {CHOICES}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``$DMGRD_BACKEND``, else ``"auto"``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_choice(os.environ.get("DMGRD_BACKEND", "auto") or "auto", "DMGRD_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (``"ext"``, ``"triton"``, ``"torch"`` or ``"auto"``) for the ops called inside."""
    token = _forced.set(_check_choice(name, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why Triton kernels cannot run on ``device_type`` here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        return None if triton_interpreted() else "CPU tensors need the interpreter (TRITON_INTERPRET=1)"
    return f"no Triton kernels for {device_type} tensors"


def ext_unavailable_reason(device_type: str) -> str | None:
    """Why the C++/CUDA extension cannot run on ``device_type`` here, or None."""
    status = _extension.status()
    if not status.loaded:
        return status.reason
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not status.with_cuda:
            return "dmgrd._C was built without CUDA kernels (no CUDA toolkit at build time)"
        return None if torch.cuda.is_available() else "no CUDA device"
    return f"no extension kernels for {device_type} tensors"


@dataclass
class Op:
    """One hot path: its torch reference and the fast implementations registered beside it."""

    name: str
    reference: Callable
    ext: Callable | None = None
    triton: Callable | None = None
    triton_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    # Fastest first on CUDA; revisit with measurements from benchmarks/ on a GPU.
    cuda_order: tuple[str, ...] = ("ext", "triton")
    # True when the ext and Triton implementations are differentiable (autograd with fast backward kernels).
    differentiable: bool = False

    def __post_init__(self) -> None:
        OPS[self.name] = self

    def unavailable_reason(self, backend: str, device_type: str, dtype: torch.dtype | None = None) -> str | None:
        """Why ``backend`` cannot run this op for ``device_type``/``dtype`` tensors, or None if it can."""
        if backend == "torch":
            return "no CUDA device" if device_type == "cuda" and not torch.cuda.is_available() else None
        if backend == "ext":
            return "no extension kernel for this op" if self.ext is None else ext_unavailable_reason(device_type)
        if backend == "triton":
            if self.triton is None:
                return "no Triton kernel for this op"
            if dtype is not None and dtype not in self.triton_dtypes:
                return f"the Triton kernel does not take {dtype}"
            return triton_unavailable_reason(device_type)
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")

    def select(self, tensors: Sequence[torch.Tensor]) -> str:
        """The backend that runs a call on ``tensors``."""
        device_type = tensors[0].device.type
        dtype = tensors[0].dtype
        requested = requested_backend()
        needs_backward = not self.differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if requested != "auto":
            reason = self.unavailable_reason(requested, device_type, dtype)
            if reason is None and needs_backward and requested != "torch":
                reason = "its kernels have no backward, and an input requires grad (use the torch or auto backend)"
            if reason is not None:
                raise BackendUnavailableError(
                    f"dmgrd.ops.{self.name}: backend {requested!r} was forced but cannot run on "
                    f"{device_type} {dtype} tensors: {reason}"
                )
            return requested
        if needs_backward:
            return "torch"
        order = self.cuda_order if device_type == "cuda" else ("ext",)
        for backend in order:
            if self.unavailable_reason(backend, device_type, dtype) is None:
                return backend
        return "torch"

    def implementation(self, backend: str) -> Callable:
        """The function of ``backend`` (the reference for ``"torch"``); raises if this op has none there."""
        fn = {"ext": self.ext, "triton": self.triton, "torch": self.reference}[backend]
        if fn is None:
            raise BackendUnavailableError(f"dmgrd.ops.{self.name} has no {backend} implementation")
        return fn

    def __call__(self, tensors: Sequence[torch.Tensor], *args):
        backend = self.select(tensors)
        fn = self.implementation(backend)
        if backend == "triton" and tensors[0].is_cuda:  # Triton launches on the current device, not the tensors'
            with torch.cuda.device(tensors[0].device):
                return fn(*args)
        return fn(*args)


def extension_op(name: str) -> Callable:
    """A call of the extension's ``torch.ops.dmgrd.<name>``, looked up per call (the extension may be absent)."""
    return lambda *args: getattr(torch.ops.dmgrd, name)(*args)


def triton_kernel(module: str, function: str) -> Callable:
    """A call of ``dmgrd.kernels.<module>.<function>``, imported when first called (Triton may be absent)."""
    return lambda *args: getattr(importlib.import_module(f"dmgrd.kernels.{module}"), function)(*args)


def register_fake(name: str) -> Callable[[Callable], Callable]:
    """``torch.library.register_fake`` of ``dmgrd::<name>`` (the shapes of its outputs, for ``torch.compile``)
    when the extension, which defines the schema, is loaded."""

    def decorate(fn: Callable) -> Callable:
        if _extension.loaded():
            torch.library.register_fake(f"dmgrd::{name}")(fn)
        return fn

    return decorate


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, on which devices, and why not where it cannot."""

    available: bool
    devices: tuple[str, ...]
    detail: str


def backends() -> dict[str, BackendStatus]:
    """Status of each backend on this machine (extension loaded or why not, Triton mode, devices)."""
    device_types = ("cpu", "cuda")
    result = {}
    for backend in BACKENDS:
        if backend == "ext":
            reasons = {d: ext_unavailable_reason(d) for d in device_types}
            status = _extension.status()
            detail = status.describe()
        elif backend == "triton":
            reasons = {d: triton_unavailable_reason(d) for d in device_types}
            detail = "interpreter (TRITON_INTERPRET=1)" if triton_interpreted() else "compiled"
            if importlib.util.find_spec("triton") is None:
                detail = "triton is not installed"
        else:
            reasons = {"cpu": None, "cuda": None if torch.cuda.is_available() else "no CUDA device"}
            detail = f"torch {torch.__version__}"
        devices = tuple(d for d, r in reasons.items() if r is None)
        unavailable = "; ".join(f"{d}: {r}" for d, r in reasons.items() if r is not None)
        result[backend] = BackendStatus(bool(devices), devices, detail + (f" ({unavailable})" if unavailable else ""))
    return result


def op_table() -> list[tuple[str, str, str, str]]:
    """Rows ``(op, backend, device, "available" or the reason it is not)`` for every registered op."""
    rows = []
    for op in OPS.values():
        for backend in BACKENDS:
            for device in ("cpu", "cuda"):
                reason = op.unavailable_reason(backend, device)
                rows.append((op.name, backend, device, "available" if reason is None else reason))
    return rows
