"""Benchmark helpers: device-synchronised timing and throughput figures in ``extra_info``."""

from __future__ import annotations

import importlib

import pytest
import torch


def backend_device_cases(op_name: str) -> list:
    """(backend, device) params: every backend of ``op_name`` that can run here, others skipped with the reason."""
    op = importlib.import_module("dmgrd.ops._dispatch").OPS[op_name]
    cases = []
    for device in ("cpu", "cuda"):
        for backend in ("torch", "ext", "triton"):
            reason = op.unavailable_reason(backend, device)
            if device == "cpu" and backend == "triton" and reason is None:
                reason = "the Triton interpreter is not a fast path"
            marks = [pytest.mark.skipif(reason is not None, reason=f"{backend} on {device}: {reason}")]
            cases.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return cases


def synchronized(fn, device: str):
    """``fn`` followed by a device synchronisation, so host clocks measure the finished work."""

    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def record_throughput(benchmark, images: int, bytes_moved: int, flops: int = 0) -> None:
    """images/s, achieved GB/s and (when ``flops`` is given) TFLOP/s from the benchmark's median time."""
    median = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = round(images / median, 1)
    benchmark.extra_info["GB_per_s"] = round(bytes_moved / median / 1e9, 2)
    if flops:
        benchmark.extra_info["TFLOP_per_s"] = round(flops / median / 1e12, 4)
