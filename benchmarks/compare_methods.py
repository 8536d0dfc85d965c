"""Train every method on one MVTec AD category with the same teacher, data and budget, and print one table:
image AUROC, pixel AUROC, AUPRO@0.3, training time, inference images/s and peak memory.

    python benchmarks/compare_methods.py --category bottle --backbone efficientnet_lite0 --steps 300

Each method runs in its own fresh process, so the peak memory column is that method's alone: the peak
resident set size of the process on CPU (it includes torch itself, about 0.5 GB), the peak CUDA allocation
on a GPU. Inference images/s times the forward pass alone (teacher, student, anomaly map and score) over the
test images in batches, after one warm-up batch, with the device synchronised before the clock is read.

Data: ``--data-root``, else ``$DMGRD_DATA/mvtec_ad``, else ``../shared/data/mvtec_ad`` beside the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import time
from pathlib import Path

import torch

import dmgrd
from dmgrd.models.base import METHODS

# The comparison's row order: the shared base first, then its descendants.
ORDER = ("rd4ad", "rdpp", "dmgrd", "memkd", "drd")


def default_root() -> Path:
    if os.environ.get("DMGRD_DATA"):
        return Path(os.environ["DMGRD_DATA"]) / "mvtec_ad"
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def build(method: str, args) -> dmgrd.models.AnomalyModel:
    cls = METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    options = {"textures": args.textures} if args.textures and "textures" in fields else {}
    return cls(args.backbone, weights=args.weights, preset=args.preset, image_size=args.image_size, seed=args.seed,
               **options).to(args.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def inference_images_per_s(model, test, batch_size: int) -> float:
    """Forward-pass throughput over the test images (one warm-up batch first)."""
    images = torch.stack([test[i]["image"] for i in range(len(test))]).to(model.device)
    model.eval()
    model(images[:batch_size])
    synchronize(model.device)
    start = time.perf_counter()
    for chunk in images.split(batch_size):
        model(chunk)
    synchronize(model.device)
    return len(images) / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run(method: str, args) -> dict:
    torch.manual_seed(args.seed)
    train = dmgrd.data.MVTecAD(args.data_root, args.category, "train", image_size=args.image_size)
    test = dmgrd.data.MVTecAD(args.data_root, args.category, "test", image_size=args.image_size)
    model = build(method, args)
    start = time.perf_counter()
    history = model.fit(train, steps=args.steps, batch_size=args.batch_size, progress=not args.quiet)
    train_s = time.perf_counter() - start
    metrics = dmgrd.evaluate(model, test, batch_size=args.batch_size, progress=not args.quiet)
    return {
        "method": method,
        "preset": args.preset,
        **metrics,
        "train_s": round(train_s, 1),
        "steps_per_s": round(args.steps / train_s, 3),
        "images_per_s": round(inference_images_per_s(model, test, args.batch_size), 2),
        "peak_memory_mb": round(peak_memory_mb(model.device), 1),
        "final_loss": history[-1]["loss"],
    }


def _child(method: str, args, queue) -> None:
    queue.put(run(method, args))


def run_isolated(method: str, args) -> dict:
    """:func:`run` in a fresh process, so the peak memory is this method's."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{method} failed with exit code {process.exitcode}")
    return result


def table(results: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| method | image AUROC | pixel AUROC | AUPRO@0.3 | train s | images/s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pixel_aupro']:.4f} | "
              f"{r['train_s']:.0f} | {r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} |" for r in results]
    return "\n".join(lines)


def main() -> None:
    available = [m for m in ORDER if m in METHODS] + sorted(set(METHODS) - set(ORDER))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=default_root())
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--methods", nargs="+", default=available, choices=available)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--preset", default="clean", choices=["clean", "official"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--textures", help="texture folder (DTD layout) for methods that take one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if not args.data_root.is_dir():
        parser.error(f"MVTec AD folder not found: {args.data_root} (pass --data-root)")
    results = []
    for method in args.methods:
        results.append(run_isolated(method, args))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{args.category}, {args.backbone} ({args.weights}), {args.image_size}px, {args.preset} presets, "
          f"{args.steps} steps x batch {args.batch_size}, seed {args.seed}, {args.device}\n")
    print(table(results))


if __name__ == "__main__":
    main()
