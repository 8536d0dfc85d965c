"""Inference images/s of one model at its default memory sizes, plain, optimised or compiled (a script)::

    python benchmarks/inference_speed.py --mode optimized --preset light
    PYTHONPATH=/path/to/older/checkout python benchmarks/inference_speed.py --mode plain   # the same for old code

Builds ``--method`` with the ImageNet efficientnet_lite0 teacher (or ``--backbone``), builds its data state from
32 random images, then times ``--rounds`` forwards of one random batch of 8 and of 1 and prints the median
images/s of each. It uses only what every version of the API has (``prepare``; ``optimize`` when asked), so an
older checkout on ``PYTHONPATH`` is timed the same way: run the processes one after another, alternating, on an
otherwise idle machine. ``--mode compiled`` also prints the warm-up (compilation) seconds of each batch size.
``--against-direct`` times the optimised model beside a copy optimised with ``window_gemm=False`` in the same
process, round by round in turn, with a 2048^3 ``torch.mm`` between rounds, and prints each one's share of that
GEMM rate (the model's FLOPs from ``FlopCounterMode``): a comparison the machine's drift cannot tilt.
"""

import argparse
import ast
import copy
import statistics
import time

import torch
from stage_profiler import gemm_gflops

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
    parser.add_argument("--against-direct", action="store_true",
                        help="also time a copy optimised with window_gemm=False, interleaved, and the GEMM rate")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=PYTHON_LITERAL",
                        help="a config option, e.g. memory_map_levels=() (repeatable)")
    args = parser.parse_args()
    if args.against_direct and args.mode == "plain":
        parser.error("--against-direct compares two optimised models: use --mode optimized or compiled")
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
    models = {"": model}
    if args.against_direct:
        models = {"gemm": copy.deepcopy(model), "direct": copy.deepcopy(model)}
    if args.mode != "plain":
        for name, each in models.items():  # window_gemm only when asked: older checkouts lack the keyword
            direct = {"window_gemm": False} if args.direct_convolutions or name == "direct" else {}
            each.optimize(compile=args.mode == "compiled", **direct)
    images = torch.rand(8, 3, args.size, args.size, generator=gen)
    seconds = {(name, batch): [] for name in models for batch in (8, 1)}
    gemm_rates = []
    with torch.no_grad():
        for (name, batch) in seconds:
            start = time.perf_counter()
            models[name](images[:batch])
            if args.mode == "compiled":
                print(f"{name} warm-up (compilation) at batch {batch}: {time.perf_counter() - start:.0f} s")
            models[name](images[:batch])
        for _ in range(args.rounds):
            if args.against_direct:
                gemm_rates.append(gemm_gflops(torch.device("cpu"), repeats=1))
            for (name, batch), times in seconds.items():
                start = time.perf_counter()
                models[name](images[:batch])
                times.append(time.perf_counter() - start)
    extra = "".join(f" {item}" for item in args.option) + (" direct" if args.direct_convolutions else "")
    flops = image_flops(model, images[:1]) if args.against_direct else None
    for name in models:
        rates = {batch: batch / statistics.median(seconds[name, batch]) for batch in (8, 1)}
        line = (f"{args.method} {args.backbone} {args.preset}{extra} {args.mode}{' ' + name if name else ''} "
                f"{args.size}x{args.size}, {torch.get_num_threads()} threads: batch 8 {rates[8]:.3g} images/s, "
                f"batch 1 {rates[1]:.3g} images/s")
        if flops is not None:
            gemm = statistics.median(gemm_rates)
            line += (f"; {flops / 1e9:.1f} GFLOP/image, {100 * rates[8] * flops / 1e9 / gemm:.0f} % / "
                     f"{100 * rates[1] * flops / 1e9 / gemm:.0f} % of the GEMM rate {gemm:.0f} GFLOP/s")
        print(line)


def image_flops(model, image: torch.Tensor) -> int:
    """FLOPs of one plain forward of ``image`` (the convolutions and products ``FlopCounterMode`` counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return counter.get_total_flops()


if __name__ == "__main__":
    main()
