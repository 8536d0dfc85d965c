"""Command line: ``dmgrd info`` (backends and devices) and ``dmgrd demo`` (the ops end to end)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import time
from collections.abc import Sequence

import torch

import dmgrd
from dmgrd import ops


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Print versions, devices, and per op and backend whether it runs here or why not."""
    print(f"dmgrd {dmgrd.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {_version('triton')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)}  (CUDA {torch.version.cuda})")
    else:
        print("cuda: no device")
    print(f"backend requested: {ops.requested_backend()}  (DMGRD_BACKEND or dmgrd.ops.use_backend)")
    print("\nbackends:")
    for name, status in ops.backends().items():
        print(f"  {name:<7} {'yes' if status.available else 'no ':<4} {status.detail}")
    print("\nops:")
    rows = ops.op_table()
    width = max(len(r[0]) for r in rows)
    for op, backend, device, state in rows:
        print(f"  {op:<{width}}  {backend:<7} {device:<5} {state}")
    return 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def demo(batch: int, device: str, seed: int) -> int:
    """Anomaly maps and scores of random teacher/student pyramids on every backend that runs here."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    teacher = [torch.randn(batch, *s, generator=gen).to(dev) for s in shapes]
    # The student matches the teacher except in a square "defect" region of the last image.
    student = [t + 0.1 * torch.randn(t.shape, generator=gen).to(dev) for t in teacher]
    for s in student:
        size = s.shape[-1]
        s[-1, :, size // 4 : size // 2, size // 4 : size // 2] = torch.randn(s.shape[1], size // 4, size // 4,
                                                                             generator=gen).to(dev)
    reference = ops.anomaly_map_reference(teacher, student, (256, 256))
    print(f"random pyramids {shapes}, batch {batch}, on {dev}; last image has a defect")
    for backend, status in ops.backends().items():
        if dev.type not in status.devices:
            print(f"  {backend:<7} skipped: {status.detail}")
            continue
        if backend == "triton" and dev.type == "cpu":
            print(f"  {backend:<7} skipped: the Triton interpreter is for tests, not a fast path")
            continue
        with ops.use_backend(backend):
            try:
                ops.anomaly_map(teacher, student, (256, 256))
            except ops.BackendUnavailableError as exc:
                print(f"  {backend:<7} skipped: {exc}")
                continue
            _synchronize(dev)
            start = time.perf_counter()
            maps = ops.anomaly_map(teacher, student, (256, 256))
            _synchronize(dev)
            elapsed = time.perf_counter() - start
            scores = ops.image_score(maps, "topk_mean", k=100)
        err = (maps - reference).abs().max().item()
        print(f"  {backend:<7} {batch / elapsed:8.1f} images/s  max |map - reference| {err:.2e}  "
              f"scores {[round(v, 3) for v in scores.tolist()]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmgrd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends, devices and versions")
    demo_parser = commands.add_parser("demo", help="the anomaly-map op end to end on random features")
    demo_parser.add_argument("--batch-size", type=int, default=4)
    demo_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return demo(args.batch_size, args.device, args.seed)
