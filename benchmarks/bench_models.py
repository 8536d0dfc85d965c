"""End-to-end speed of every method: inference images/s and training step time with a per-stage breakdown.

For every method x teacher (wide_resnet50_2 with random weights, efficientnet_lite0) x preset (clean and the
official path as the reference): inference at batch 1 and 8 (64 on a GPU), plain and after
``model.optimize()``, and one training step (forward, backward, optimizer) with its peak memory (peak RSS on
CPU, ``torch.cuda.max_memory_allocated`` on a GPU). ``extra_info`` holds the stage breakdown (ms, GFLOPs from
``FlopCounterMode``, achieved GFLOP/s) beside this machine's fp32 GEMM rate measured in the same run.

    make bench-models                      # 64x64: ~15 min for all methods on a 2-core CPU, then the table
    DMGRD_BENCH_METHODS=dmgrd,rd4ad,patchcore make bench-models   # ~7 min
    DMGRD_BENCH_FULL=1 make bench-models   # 256x256, batch 8 training

Environment: ``DMGRD_BENCH_SIZE`` (image side, default 64; 256 with ``DMGRD_BENCH_FULL``),
``DMGRD_BENCH_TRAIN_BATCH`` (default 2; 8 with ``DMGRD_BENCH_FULL``), ``DMGRD_BENCH_METHODS`` and
``DMGRD_BENCH_BACKBONES`` (comma-separated subsets), ``DMGRD_BENCH_PRESETS`` (default ``clean,official``),
``DMGRD_BENCH_DEVICE`` (default cuda when present), ``DMGRD_BENCH_COMPILE=1`` (also ``optimize(compile=True)``,
with its warm-up time; minutes per model on CPU).
"""

from __future__ import annotations

import copy
import functools
import os
import time

import pytest
import torch
from stage_profiler import StageProfiler, gemm_gflops, synchronize

from dmgrd.models.base import METHODS
from dmgrd.models.recompute import activation_checkpointing
from dmgrd.models.training import make_optimizer

FULL = os.environ.get("DMGRD_BENCH_FULL") == "1"
SIZE = int(os.environ.get("DMGRD_BENCH_SIZE", 256 if FULL else 64))
TRAIN_BATCH = int(os.environ.get("DMGRD_BENCH_TRAIN_BATCH", 8 if FULL else 2))
DEVICE = torch.device(os.environ.get("DMGRD_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
BATCHES = (1, 64) if DEVICE.type == "cuda" else (1, 8)
ROUNDS = 10 if DEVICE.type == "cuda" else 2
COMPILE = os.environ.get("DMGRD_BENCH_COMPILE") == "1"  # adds the torch.compile'd model (minutes of warm-up on CPU)
TEACHERS = {"wide_resnet50_2": None, "efficientnet_lite0": "imagenet"}  # no ImageNet WRN50 weights offline
METHOD_NAMES = os.environ.get("DMGRD_BENCH_METHODS", ",".join(sorted(METHODS))).split(",")
BACKBONE_NAMES = os.environ.get("DMGRD_BENCH_BACKBONES", ",".join(TEACHERS)).split(",")
PRESET_NAMES = os.environ.get("DMGRD_BENCH_PRESETS", "clean,official").split(",")
# Small banks keep prepare() cheap; the memory search cost grows with them (DM-GRD's default is 30).
MEMORY_OPTIONS = {"dmgrd": {"memory_size": 8, "texture_count": 4}, "memkd": {"exemplars": 8}}


@functools.lru_cache(maxsize=1)
def gemm_rate() -> float:
    return round(gemm_gflops(DEVICE), 1)


@functools.lru_cache(maxsize=1)
def prepared(method: str, backbone: str, preset: str) -> torch.nn.Module:
    """A model with its data-built state (memory banks, coreset) from random images; the last one is cached."""
    torch.manual_seed(0)
    model = METHODS[method](backbone, weights=TEACHERS[backbone], preset=preset, image_size=SIZE,
                            **MEMORY_OPTIONS.get(method, {})).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(3, SIZE, SIZE, generator=gen)} for _ in range(8)]
    model.train()
    model.prepare(data, torch.Generator().manual_seed(1), batch_size=4)
    return model.eval()


def peak_memory_reset() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (VmHWM)
            f.write("5")


def peak_memory_mb() -> float:
    """Peak CUDA allocation, or the process's peak resident set size on CPU, since the last reset."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def record(benchmark, profiler: StageProfiler, counted: StageProfiler, runs: int, images: int) -> None:
    """images/s, the stage breakdown (time from ``profiler``, FLOPs from ``counted``) and the GEMM rate."""
    median = benchmark.stats.stats.median
    timed, flops = profiler.breakdown(runs), counted.breakdown(1)
    stages = {}
    for name in sorted(set(timed) | set(flops)):
        ms = timed.get(name, {}).get("ms", 0.0)
        gflop = flops.get(name, {}).get("GFLOP", 0.0)
        stages[name] = {"ms": ms, "GFLOP": gflop, "GFLOP_per_s": round(gflop / ms * 1e3, 1) if ms else 0.0}
    benchmark.extra_info.update({
        "images_per_s": round(images / median, 2),
        "stages": stages,
        "GFLOP_total": round(sum(s["GFLOP"] for s in stages.values()), 3),
        "gemm_fp32_GFLOP_per_s": gemm_rate(),
        "size": SIZE,
        "device": str(DEVICE),
    })


CASES = [pytest.param(m, b, p, id=f"{m}-{b}-{p}")
         for m in METHOD_NAMES for b in BACKBONE_NAMES for p in PRESET_NAMES]


@pytest.mark.parametrize("mode", ["plain", "optimized", "train", "train-recompute",
                                  *(["compiled"] if COMPILE else [])])
@pytest.mark.parametrize("method,backbone,preset", CASES)
def test_model(benchmark, method, backbone, preset, mode):
    model = prepared(method, backbone, preset)
    benchmark.group = f"{method} {backbone} {SIZE}x{SIZE} {DEVICE.type}"
    if mode.startswith("train"):
        if not model.needs_training:
            pytest.skip(f"{method} has no training step (fit builds its memory bank)")
        bench_training(benchmark, model, recompute=mode == "train-recompute")
        return
    if mode == "compiled":
        bench_compiled(benchmark, copy.deepcopy(model).optimize(compile=True))
        return
    if mode == "optimized":
        model = copy.deepcopy(model).optimize()
    for batch in BATCHES:
        benchmark_inference(benchmark, model, batch, mode)


def bench_compiled(benchmark, model) -> None:
    """images/s of the compiled model at the largest batch and the warm-up (compilation) time; no stage
    breakdown (hooks inside a compiled graph would break it)."""
    batch = BATCHES[-1]
    images = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    start = time.perf_counter()
    model(images)
    synchronize(DEVICE)
    benchmark.extra_info.update({"mode": "compiled", "batch": batch,
                                 "compile_warmup_s": round(time.perf_counter() - start, 1)})
    benchmark.pedantic(lambda: (model(images), synchronize(DEVICE)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 2)


def benchmark_inference(benchmark, model, batch: int, mode: str) -> None:
    images = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    profiler, counted = StageProfiler(model), StageProfiler(model)

    def run():
        model(images)
        synchronize(DEVICE)

    run()
    with counted.attached(count_flops=True):
        model(images)
    if batch != BATCHES[-1]:  # the smaller batch: images/s only (mean of ROUNDS), beside the benchmark's timing
        with profiler.attached():
            for _ in range(ROUNDS):
                run()
        benchmark.extra_info[f"images_per_s_batch{batch}"] = round(batch * ROUNDS / profiler.seconds_total(), 2)
        return
    benchmark.extra_info["mode"], benchmark.extra_info["batch"] = mode, batch
    with profiler.attached():
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    record(benchmark, profiler, counted, ROUNDS, batch)


def bench_training(benchmark, model, recompute: bool) -> None:
    """One training step, with activation checkpointing when ``recompute``."""
    with activation_checkpointing(model.recomputed_modules() if recompute else []):
        _bench_training(benchmark, model, "train-recompute" if recompute else "train")


def _bench_training(benchmark, model, mode: str) -> None:
    model.train()
    optimizer = make_optimizer(model)
    images = torch.rand(TRAIN_BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    profiler, counted = StageProfiler(model), StageProfiler(model)

    def step(profiler: StageProfiler):
        losses = model.training_losses(images, torch.Generator().manual_seed(4))
        optimizer.zero_grad(set_to_none=True)
        with profiler.stage("backward"):
            losses["loss"].backward()
        with profiler.stage("optimizer"):
            optimizer.step()

    step(StageProfiler(model))  # warm-up: Adam's state, allocator
    with counted.attached(count_flops=True):
        step(counted)
    peak_memory_reset()
    with profiler.attached():
        benchmark.pedantic(step, args=(profiler,), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({"mode": mode, "batch": TRAIN_BATCH, "peak_memory_MB": round(peak_memory_mb())})
    record(benchmark, profiler, counted, ROUNDS, TRAIN_BATCH)
    model.eval()
