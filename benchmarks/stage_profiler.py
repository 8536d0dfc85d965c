"""Per-stage wall time and FLOPs of a model's forward (and training step) without code inside the models.

:class:`StageProfiler` hooks the model's existing sub-modules (``teacher``, ``fusion``, ``decoder``, ...) and
wraps a few of its callables (the anomaly synthesiser), synchronises the device at every stage boundary and
books the time (and, inside a :class:`torch.utils.flop_counter.FlopCounterMode`, the FLOPs) since the last
boundary to the innermost running stage, so nested stages (MemKD's memories inside the decoder) are exclusive.
What no stage claims is booked to ``"other"`` (for a forward: the anomaly map and the score).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Stage -> attribute names of the model's sub-modules (or methods, or "attribute.method") that belong to it.
STAGES: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher",),
    "synthesis": ("synthesizer.synth", "pseudo_anomalies"),
    "memory": ("normal_memory.select", "abnormal_memory.select", "memories"),
    "fusion": ("fusion", "projection"),
    "student": ("bottleneck", "decoder"),
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageProfiler:
    """Accumulates seconds and FLOPs per stage of ``model`` while :meth:`attached`."""

    def __init__(self, model: nn.Module, stages: dict[str, tuple[str, ...]] = STAGES):
        self.model = model
        self.stages = stages
        self.device = next(model.parameters()).device
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._mark = (0.0, 0)
        self._counter: FlopCounterMode | None = None

    # -- clock ------------------------------------------------------------------------------------------
    def _now(self) -> tuple[float, int]:
        synchronize(self.device)
        return time.perf_counter(), self._counter.get_total_flops() if self._counter is not None else 0

    def _book(self) -> None:
        """Charge the time and FLOPs since the last boundary to the running stage (or "other")."""
        now = self._now()
        stage = self._stack[-1] if self._stack else "other"
        self.seconds[stage] += now[0] - self._mark[0]
        self.flops[stage] += now[1] - self._mark[1]
        self._mark = now

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Book the enclosed code to ``name`` (explicit timing: backward, optimizer)."""
        self._book()
        self._stack.append(name)
        try:
            yield
        finally:
            self._book()
            self._stack.pop()

    # -- attaching ----------------------------------------------------------------------------------------
    def _targets(self) -> Iterator[tuple[str, object, str]]:
        """(stage, owner, attribute) of every listed part the model has."""
        for stage, names in self.stages.items():
            for name in names:
                owner: object = self.model
                *path, attribute = name.split(".")
                for part in path:
                    owner = getattr(owner, part, None)
                if owner is not None and getattr(owner, attribute, None) is not None:
                    yield stage, owner, attribute

    @contextlib.contextmanager
    def attached(self, count_flops: bool = False) -> Iterator[StageProfiler]:
        """Hooks on while inside; with ``count_flops`` a FlopCounterMode runs too (slower: time one without)."""
        undo: list[Callable[[], None]] = []
        for stage, owner, attribute in self._targets():
            part = getattr(owner, attribute)
            if isinstance(part, nn.Module):
                for module in part if isinstance(part, nn.ModuleList) else [part]:
                    undo.append(module.register_forward_pre_hook(self._enter(stage)).remove)
                    undo.append(module.register_forward_hook(self._leave, always_call=True).remove)
            else:
                setattr(owner, attribute, self._wrapped(stage, part))
                undo.append(lambda owner=owner, attribute=attribute: delattr(owner, attribute))
        counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        try:
            with counter:
                self._counter = counter if count_flops else None
                self._mark = self._now()
                yield self
                self._book()
        finally:
            self._counter = None
            for step in reversed(undo):
                step()

    def _enter(self, stage: str) -> Callable:
        def hook(module, args):
            self._book()
            self._stack.append(stage)

        return hook

    def _leave(self, module, args, output) -> None:
        self._book()
        self._stack.pop()

    def _wrapped(self, stage: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            with self.stage(stage):
                return fn(*args, **kwargs)

        return run

    # -- results ------------------------------------------------------------------------------------------
    def seconds_total(self) -> float:
        return sum(self.seconds.values())

    def breakdown(self, runs: int = 1) -> dict[str, dict[str, float]]:
        """Per stage: milliseconds and GFLOPs per run, and the achieved GFLOP/s (FLOPs from a counted run)."""
        result = {}
        for stage in sorted(set(self.seconds) | set(self.flops)):
            ms = 1e3 * self.seconds.get(stage, 0.0) / runs
            gflop = self.flops.get(stage, 0) / runs / 1e9
            result[stage] = {"ms": round(ms, 2), "GFLOP": round(gflop, 3)}
        return result


def gemm_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 GEMM rate: GFLOP/s of a ``size`` x ``size`` torch.mm, best of ``repeats``."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
