"""Train methods on one MVTec AD category and report image/pixel AUROC, training and inference speed.

    python benchmarks/mvtec_accuracy.py --category bottle --backbone efficientnet_lite0 --steps 600

Data: ``--data-root``, else ``$DMGRD_DATA/mvtec_ad``, else ``../shared/data/mvtec_ad`` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import dmgrd

METHODS = {"dmgrd": dmgrd.DMGRD, "rd4ad": dmgrd.RD4AD}


def default_root() -> Path:
    if os.environ.get("DMGRD_DATA"):
        return Path(os.environ["DMGRD_DATA"]) / "mvtec_ad"
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def run(method: str, args) -> dict:
    torch.manual_seed(args.seed)
    train = dmgrd.data.MVTecAD(args.data_root, args.category, "train", image_size=args.image_size)
    test = dmgrd.data.MVTecAD(args.data_root, args.category, "test", image_size=args.image_size)
    options = {"textures": args.textures} if method == "dmgrd" and args.textures else {}
    model = METHODS[method](args.backbone, weights=args.weights, preset=args.preset, image_size=args.image_size,
                            seed=args.seed, **options).to(args.device)
    start = time.perf_counter()
    history = model.fit(train, steps=args.steps, batch_size=args.batch_size)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = dmgrd.evaluate(model, test, batch_size=args.batch_size)
    eval_s = time.perf_counter() - start
    return {
        "method": method,
        "preset": args.preset,
        **metrics,
        "train_s": round(train_s, 1),
        "steps_per_s": round(args.steps / train_s, 3),
        "test_images_per_s": round(len(test) / eval_s, 2),
        "final_loss": history[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=default_root())
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--preset", default="clean")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--textures", help="texture folder (DTD layout); default: procedural textures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    results = [run(method, args) for method in args.methods]
    print(f"\n{args.category}, {args.backbone}, {args.image_size}px, {args.steps} steps x batch {args.batch_size}, "
          f"{args.device}")
    print(f"{'method':<8} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO@0.3':>9} {'train s':>8} {'steps/s':>8} "
          f"{'test img/s':>10}")
    for r in results:
        print(f"{r['method']:<8} {r['image_auroc']:>11.4f} {r['pixel_auroc']:>11.4f} {r['pixel_aupro']:>9.4f} "
              f"{r['train_s']:>8.1f} {r['steps_per_s']:>8.3f} {r['test_images_per_s']:>10.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
