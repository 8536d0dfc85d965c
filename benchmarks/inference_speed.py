"""Inference images/s of one model at its default memory sizes, plain, optimised or compiled (a script)::

    python benchmarks/inference_speed.py --mode optimized --preset light
    PYTHONPATH=/path/to/older/checkout python benchmarks/inference_speed.py --mode plain   # the same for old code

Builds ``--method`` with the ImageNet efficientnet_lite0 teacher (or ``--backbone``), builds its data state from
32 random images, then times ``--rounds`` forwards of one random batch of 8 and of 1 and prints the median
images/s of each. It uses only what every version of the API has (``prepare``; ``optimize`` when asked), so an
older checkout on ``PYTHONPATH`` is timed the same way: run the processes one after another, alternating, on an
otherwise idle machine. ``--mode compiled`` also prints the warm-up (compilation) seconds of each batch size.
"""

import argparse
import ast
import statistics
import time

import torch

from dmgrd.models.base import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dmgrd", choices=sorted(METHODS))
    parser.add_argument("--preset", default="clean")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help='"imagenet" or "none" (random)')
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mode", choices=("plain", "optimized", "compiled"), default="optimized")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--direct-convolutions", action="store_true",
                        help="optimize(window_gemm=False): every convolution through oneDNN, as before")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=PYTHON_LITERAL",
                        help="a config option, e.g. memory_map_levels=() (repeatable)")
    args = parser.parse_args()
    config = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.option)}
    torch.manual_seed(0)
    weights = None if args.weights == "none" else args.weights
    model = METHODS[args.method](args.backbone, weights=weights, preset=args.preset, image_size=args.size,
                                 **config)
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(3, args.size, args.size, generator=gen)} for _ in range(32)]
    model.train()
    model.prepare(data, torch.Generator().manual_seed(1), batch_size=8)
    model.eval()
    if args.mode != "plain":
        direct = {"window_gemm": False} if args.direct_convolutions else {}  # older checkouts lack the keyword
        model.optimize(compile=args.mode == "compiled", **direct)
    images = torch.rand(8, 3, args.size, args.size, generator=gen)
    rates = {}
    for batch in (8, 1):
        with torch.no_grad():
            start = time.perf_counter()
            model(images[:batch])
            warmup = time.perf_counter() - start
            model(images[:batch])
            seconds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                model(images[:batch])
                seconds.append(time.perf_counter() - start)
        rates[batch] = batch / statistics.median(seconds)
        if args.mode == "compiled":
            print(f"warm-up (compilation) at batch {batch}: {warmup:.0f} s")
    extra = "".join(f" {item}" for item in args.option) + (" direct" if args.direct_convolutions else "")
    print(f"{args.method} {args.backbone} {args.preset}{extra} {args.mode} {args.size}x{args.size}, "
          f"{torch.get_num_threads()} threads: batch 8 {rates[8]:.3g} images/s, batch 1 {rates[1]:.3g} images/s")


if __name__ == "__main__":
    main()
