"""Which teacher levels carry PatchCore's decision on a data set (a script, not a benchmark test).

One feature extraction, then a patch kNN per choice of levels with a random share of the training patches as
memory and the largest patch distance as the image score; prints image AUROC, pixel AUROC and AUPRO@0.3::

    OMP_NUM_THREADS=1 python benchmarks/patchcore_features.py ../shared/data/kolektorsdd/kolektor --size 640x256
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import dmgrd
from dmgrd import metrics
from dmgrd.layout import parse_size, pixel_rows
from dmgrd.ops.anomaly_map import gaussian_blur_reference

# name: (level indices, each level scaled to unit length)
CHOICES = {"levels 2 + 3": ((1, 2), False), "level 2": ((1,), False), "level 3": ((2,), False),
           "levels 2 + 3, unit length each": ((1, 2), True), "level 3, unit length": ((2,), True)}


def pooled_levels(model: dmgrd.PatchCore, data, batch_size: int = 8) -> list[torch.Tensor]:
    """The teacher's 3x3-averaged levels of every image of ``data``."""
    levels: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            images = torch.stack([data[i]["image"] for i in range(start, min(start + batch_size, len(data)))])
            for level, f in enumerate(model.teacher(model.input_images(images))):
                levels[level].append(F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False))
    return [torch.cat(level) for level in levels]


def concatenated(levels: list[torch.Tensor], chosen: tuple[int, ...], unit: bool) -> torch.Tensor:
    size = levels[chosen[0]].shape[-2:]
    picked = [F.normalize(levels[i], dim=1) if unit else levels[i] for i in chosen]
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                      if f.shape[-2:] != size else f for f in picked], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path, help="a category folder in the MVTec AD layout")
    parser.add_argument("--size", type=parse_size, default=(256, 256), help="N or HxW")
    parser.add_argument("--memory-share", type=float, default=0.25, help="random share of training patches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = dmgrd.data.MVTecAD(args.category.parent, args.category.name, "train", image_size=args.size)
    test = dmgrd.data.MVTecAD(args.category.parent, args.category.name, "test", image_size=args.size)
    model = dmgrd.PatchCore("efficientnet_lite0", weights="imagenet", image_size=args.size).eval()
    train_levels, test_levels = pooled_levels(model, train), pooled_levels(model, test)
    labels = [test[i]["label"] for i in range(len(test))]
    masks = torch.stack([test[i]["mask"] for i in range(len(test))]).numpy()
    for name, (chosen, unit) in CHOICES.items():
        rows = pixel_rows(concatenated(train_levels, chosen, unit))
        generator = torch.Generator().manual_seed(args.seed)  # each choice draws the same patches
        memory = rows[torch.randperm(rows.shape[0], generator=generator)[: int(args.memory_share * rows.shape[0])]]
        queries = concatenated(test_levels, chosen, unit)
        batch, _, height, width = queries.shape
        distances, _ = dmgrd.ops.memory_nearest(pixel_rows(queries), memory, 1, "l2")
        patches = distances[:, 0].clamp_min(0).sqrt().view(batch, 1, height, width)
        maps = gaussian_blur_reference(F.interpolate(patches, size=args.size, mode="bilinear", align_corners=False),
                                       4.0).numpy()
        print(f"{name}: image AUROC {metrics.image_auroc(patches.flatten(1).amax(1).numpy(), labels):.4f}, "
              f"pixel AUROC {metrics.pixel_auroc(maps, masks):.4f}, AUPRO@0.3 {metrics.aupro(maps, masks):.4f}",
              flush=True)


if __name__ == "__main__":
    main()
