"""Peak resident memory of training steps, one configuration per process (a script, not a benchmark test)::

    OMP_NUM_THREADS=1 python benchmarks/train_memory.py dmgrd --backbone wide_resnet50_2 --recompute

Prints, for each of ``--steps`` training steps (the second one holds Adam's state too), its wall-clock and
processor time (all threads: with one thread, its cost on a core of its own, however busy the machine) and the
process's peak RSS during it (peak CUDA allocation on a GPU; ``bench_models``' measure, reset before each step).
Random images and random teacher weights; DM-GRD's banks are built from 8 images.
"""

import argparse
import time

import torch
from bench_models import DEVICE, MEMORY_OPTIONS, peak_memory_mb, peak_memory_reset

from dmgrd.models.base import METHODS
from dmgrd.models.recompute import activation_checkpointing
from dmgrd.models.training import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--preset", default="clean")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = METHODS[args.method](args.backbone, weights=None, preset=args.preset, image_size=args.size,
                                 **MEMORY_OPTIONS.get(args.method, {})).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(3, args.size, args.size, generator=gen)} for _ in range(8)]
    model.train()
    model.prepare(data, torch.Generator().manual_seed(1), batch_size=4)
    optimizer = make_optimizer(model)
    images = torch.rand(args.batch_size, 3, args.size, args.size, generator=gen).to(DEVICE)
    label = f"{args.method} {args.backbone} {args.preset} {'recompute' if args.recompute else 'plain'}"
    print(f"{label}: before training, peak {peak_memory_mb() / 1024:.2f} GiB", flush=True)
    with activation_checkpointing(model.recomputed_modules() if args.recompute else []):
        for step in range(args.steps):
            peak_memory_reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            losses = model.training_losses(images, torch.Generator().manual_seed(step))
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            print(f"{label}: step {step} {time.perf_counter() - start:.1f} s ({time.process_time() - cpu_start:.1f} "
                  f"CPU s), peak {peak_memory_mb() / 1024:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
