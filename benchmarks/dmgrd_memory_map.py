"""How a trained DM-GRD's student-teacher map and its normal memory's nearest-patch distance (``memory_map_levels``)
score KolektorSDD, alone and summed with weights (a script, not a benchmark test)::

    OMP_NUM_THREADS=1 python benchmarks/dmgrd_memory_map.py runs/s0/model.pt ../shared/data/kolektorsdd/kolektor

Several checkpoints may be given (e.g. the snapshots of ``dmgrd_training_length.py``); each is scored in turn.
The checkpoint: a clean DM-GRD trained at 640x256 (``dmgrd train --data .../kolektor --method dmgrd --backbone
efficientnet_lite0 --image-size 640x256 --steps 100 --seed 0``). ``mem30`` is the model's own normal memory (30
images), ``memall`` the stride-16 patches of every training image.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import dmgrd
from dmgrd import metrics
from dmgrd.layout import pixel_rows
from dmgrd.models.memory import local_average
from dmgrd.ops.anomaly_map import gaussian_blur_reference


def unit_patches(feats: torch.Tensor) -> torch.Tensor:
    return pixel_rows(F.normalize(local_average(feats, 3), dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("category", type=Path, help="a category folder in the MVTec AD layout")
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        print(f"== {checkpoint}", flush=True)
        score_maps(dmgrd.load(checkpoint).eval(), args.category)


def score_maps(model: dmgrd.DMGRD, category: Path) -> None:
    """Print image AUROC, pixel AUROC and AUPRO@0.3 of the model's maps, taken apart, on the category's test set."""
    size = model.config.size
    train, test = (dmgrd.data.MVTecAD(category.parent, category.name, split, image_size=size)
                   for split in ("train", "test"))
    labels = [test[i]["label"] for i in range(len(test))]
    masks = torch.stack([test[i]["mask"] for i in range(len(test))]).numpy()

    def batches(data):
        for start in range(0, len(data), 8):
            yield model.input_images(torch.stack([data[i]["image"] for i in range(start, min(start + 8, len(data)))]))

    def upsampled(d: torch.Tensor) -> torch.Tensor:
        return F.interpolate(d, size=size, mode="bilinear", align_corners=True)

    with torch.no_grad():
        memories = {"mem30": unit_patches(model.normal_memory.items[2]),
                    "memall": unit_patches(torch.cat([model.teacher(x)[2] for x in batches(train)]))}
        rd_levels, memory_maps = [], {name: [] for name in memories}
        for images in batches(test):
            teacher = model.teacher(images)
            student = model.student_features(teacher)
            rd_levels.append(torch.cat([upsampled(1 - F.cosine_similarity(t, s, dim=1)[:, None])
                                        for t, s in zip(teacher, student, strict=True)], 1))
            query = F.normalize(local_average(teacher[2], 3), dim=1)
            batch, _, height, width = query.shape
            for name, bank in memories.items():
                distance, _ = dmgrd.ops.memory_nearest(pixel_rows(query), bank, 1, "l2")
                memory_maps[name].append(upsampled((distance[:, 0].clamp_min(0) / 2).view(batch, 1, height, width)))
    rd = torch.cat(rd_levels)
    rd_sum = rd.sum(1, keepdim=True)

    def report(name: str, amap: torch.Tensor) -> None:
        amap = gaussian_blur_reference(amap, model.config.sigma).numpy()
        print(f"{name}: image AUROC {metrics.image_auroc(amap.reshape(len(amap), -1).max(1), labels):.4f}, "
              f"pixel AUROC {metrics.pixel_auroc(amap, masks):.4f}, AUPRO@0.3 {metrics.aupro(amap, masks):.4f}",
              flush=True)

    report("student-teacher map (levels 1-3)", rd_sum)
    for level in range(3):
        report(f"student-teacher level {level + 1}", rd[:, level:level + 1])
    coarse = rd[:, 1:].sum(1, keepdim=True)
    report("student-teacher levels 2-3", coarse)
    for name, parts in memory_maps.items():
        memory_map = torch.cat(parts)
        report(name, memory_map)
        for weight in (1, 3, 10):
            report(f"student-teacher + {weight} * {name}", rd_sum + weight * memory_map)
        report(f"student-teacher levels 2-3 + {name}", coarse + memory_map)


if __name__ == "__main__":
    main()
