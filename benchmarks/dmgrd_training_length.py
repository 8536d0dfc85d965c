"""Train one clean DM-GRD and keep its checkpoint every ``--every`` steps, to see how the student-teacher map
improves with training (a script, not a benchmark test)::

    OMP_NUM_THREADS=1 python benchmarks/dmgrd_training_length.py ../shared/data/kolektorsdd/kolektor runs/length \
        --size 640x256 --steps 400 --every 100
    OMP_NUM_THREADS=1 python benchmarks/dmgrd_memory_map.py runs/length/step*.pt ../shared/data/kolektorsdd/kolektor

The copies are snapshots of one run with one warm-up + cosine schedule over ``--steps``, not runs of fewer steps.
"""

import argparse
import shutil
import time
from pathlib import Path

import torch

import dmgrd
from dmgrd.sizes import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path, help="a category folder in the MVTec AD layout")
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=parse_size, default=(640, 256))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = dmgrd.data.MVTecAD(args.category.parent, args.category.name, "train", image_size=args.size)
    torch.manual_seed(args.seed)
    model = dmgrd.DMGRD(args.backbone, weights="imagenet", image_size=args.size, seed=args.seed)
    save, start = model.save, time.perf_counter()

    def save_and_copy(path, **extra):
        save(path, **extra)
        step = extra["train_state"]["step"]
        shutil.copyfile(path, args.out / f"step{step}.pt")
        print(f"step {step}: {time.perf_counter() - start:.0f} s", flush=True)

    model.save = save_and_copy  # type: ignore[method-assign]
    model.fit(train, steps=args.steps, batch_size=8, checkpoint=args.out / "training.pt", checkpoint_every=args.every)


if __name__ == "__main__":
    main()
