"""How a trained DM-GRD's student-teacher map and its normal memory's nearest-patch distance (``memory_map_levels``)
score KolektorSDD, alone and summed with weights (a script, not a benchmark test)::

    OMP_NUM_THREADS=1 python benchmarks/dmgrd_memory_map.py runs/s0/model.pt ../shared/data/kolektorsdd/kolektor

Several checkpoints may be given (e.g. the snapshots of ``dmgrd_training_length.py``); each is scored in turn.
The checkpoint: a clean DM-GRD trained at 640x256 (``dmgrd train --data .../kolektor --method dmgrd --backbone
efficientnet_lite0 --image-size 640x256 --steps 100 --seed 0``). ``mem30`` is the model's own normal memory (30
images), ``memall`` the stride-16 patches of every training image.

``--normalised`` also scores the two maps put on one scale by statistics of the training images' own maps, with
no setting read off the test set: each student-teacher level z-scored per pixel position, the memory term
z-scored over all pixels (each training image searched in the memory of the others), their sum with weights,
both maps scaled by their training 0.9 and 0.995 quantiles (as EfficientAD combines its two maps), and the two
image scores z-scored and added. It takes the training set through the model too (about 10 minutes on 1 thread).
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

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
    parser.add_argument("--normalised", action="store_true", help="also the maps on one scale (see above)")
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        print(f"== {checkpoint}", flush=True)
        model = dmgrd.load(checkpoint).eval()
        scorer = Scorer(model, args.category)
        score_maps(model, scorer)
        if args.normalised:
            score_normalised(model, scorer)


class Scorer:
    """The category's data at the model's size, and the metrics of a map of its test images."""

    def __init__(self, model: dmgrd.DMGRD, category: Path):
        self.size, self.sigma = model.config.size, model.config.sigma
        self.train, self.test = (dmgrd.data.MVTecAD(category.parent, category.name, split, image_size=self.size)
                                 for split in ("train", "test"))
        self.labels = [self.test[i]["label"] for i in range(len(self.test))]
        self.masks = torch.stack([self.test[i]["mask"] for i in range(len(self.test))]).numpy()
        self.model = model

    def batches(self, data):
        for start in range(0, len(data), 8):
            images = torch.stack([data[i]["image"] for i in range(start, min(start + 8, len(data)))])
            yield self.model.input_images(images)

    def upsampled(self, d: torch.Tensor) -> torch.Tensor:
        """[N, H, W] or [N, 1, H, W] feature-resolution maps at the image size, [N, 1, H_img, W_img]."""
        return F.interpolate(d if d.dim() == 4 else d[:, None], size=self.size, mode="bilinear", align_corners=True)

    def image_scores(self, amap: torch.Tensor) -> torch.Tensor:
        return gaussian_blur_reference(amap, self.sigma).flatten(1).amax(1)

    def report(self, name: str, amap: torch.Tensor) -> None:
        amap = gaussian_blur_reference(amap, self.sigma).numpy()
        print(f"{name}: image AUROC {metrics.image_auroc(amap.reshape(len(amap), -1).max(1), self.labels):.4f}, "
              f"pixel AUROC {metrics.pixel_auroc(amap, self.masks):.4f}, AUPRO@0.3 "
              f"{metrics.aupro(amap, self.masks):.4f}", flush=True)


def student_teacher_levels(scorer: Scorer, data) -> list[torch.Tensor]:
    """Per level, [N, H_l, W_l]: 1 - cos of teacher and student features of every image of ``data``."""
    levels = []
    with torch.no_grad():
        for images in scorer.batches(data):
            teacher = scorer.model.teacher(images)
            student = scorer.model.student_features(teacher)
            levels.append([1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)])
    return [torch.cat(level) for level in zip(*levels, strict=True)]


def level3_queries(scorer: Scorer, data) -> torch.Tensor:
    """[N, C_3, H_3, W_3]: the 3x3-averaged, unit-length stride-16 teacher features of every image of ``data``."""
    with torch.no_grad():
        return torch.cat([F.normalize(local_average(scorer.model.teacher(x)[2], 3), dim=1)
                          for x in scorer.batches(data)])


def memory_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[N, H, W]: half the squared distance of each unit query patch to its nearest unit ``bank`` row (1 - cos)."""
    batch, _, height, width = queries.shape
    distance, _ = dmgrd.ops.memory_nearest(pixel_rows(queries), bank, 1, "l2")
    return (distance[:, 0].clamp_min(0) / 2).view(batch, height, width)


def score_maps(model: dmgrd.DMGRD, scorer: Scorer) -> None:
    """Print image AUROC, pixel AUROC and AUPRO@0.3 of the model's maps, taken apart, on the category's test set."""
    train_queries = level3_queries(scorer, scorer.train)
    test_queries = level3_queries(scorer, scorer.test)
    memories = {"mem30": unit_patches(model.normal_memory.items[2]), "memall": pixel_rows(train_queries)}
    rd = torch.cat([scorer.upsampled(level) for level in student_teacher_levels(scorer, scorer.test)], 1)
    rd_sum = rd.sum(1, keepdim=True)
    scorer.report("student-teacher map (levels 1-3)", rd_sum)
    for level in range(3):
        scorer.report(f"student-teacher level {level + 1}", rd[:, level:level + 1])
    coarse = rd[:, 1:].sum(1, keepdim=True)
    scorer.report("student-teacher levels 2-3", coarse)
    for name, bank in memories.items():
        memory_map = scorer.upsampled(memory_distance(test_queries, bank))
        scorer.report(name, memory_map)
        for weight in (1, 3, 10):
            scorer.report(f"student-teacher + {weight} * {name}", rd_sum + weight * memory_map)
        scorer.report(f"student-teacher levels 2-3 + {name}", coarse + memory_map)


def score_normalised(model: dmgrd.DMGRD, scorer: Scorer) -> None:
    """Print the metrics of the student-teacher map and the every-image memory term put on one scale by the
    training images' own maps (module docstring)."""
    st_train, st_test = (student_teacher_levels(scorer, data) for data in (scorer.train, scorer.test))
    train_queries = level3_queries(scorer, scorer.train)
    patches = train_queries.shape[2] * train_queries.shape[3]
    bank = pixel_rows(train_queries)
    mem_train = torch.cat([memory_distance(train_queries[i:i + 1],
                                           torch.cat([bank[:i * patches], bank[(i + 1) * patches:]]))
                           for i in range(len(train_queries))])
    mem_test = memory_distance(level3_queries(scorer, scorer.test), bank)

    def per_pixel_z(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        return (test - train.mean(0)) / (train.std(0) + 1e-6)

    def global_z(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        return (test - train.mean()) / train.std()

    def quantile_scaled(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        sample = train.flatten()[::7]
        low, high = torch.quantile(sample, 0.9), torch.quantile(sample, 0.995)
        return 0.1 * (test - low) / (high - low)

    up = scorer.upsampled
    st_z = sum(up(per_pixel_z(tr, te)) for tr, te in zip(st_train, st_test, strict=True)) / 3
    mem_z = up(global_z(mem_train, mem_test))
    scorer.report("student-teacher, each level z-scored per pixel", st_z)
    scorer.report("memall, z-scored", mem_z)
    for weight in (0.25, 0.5, 1.0):
        scorer.report(f"{weight} * student-teacher z + memall z", weight * st_z + mem_z)
    st_sum_train, st_sum_test = (sum(up(level) for level in levels) for levels in (st_train, st_test))
    scorer.report("student-teacher and memall, quantile-scaled, summed",
                  quantile_scaled(st_sum_train, st_sum_test) + quantile_scaled(up(mem_train), up(mem_test)))
    fused = 0
    for train_map, test_map in ((st_sum_train, st_sum_test), (up(mem_train), up(mem_test))):
        train_scores = scorer.image_scores(train_map)
        fused = fused + (scorer.image_scores(test_map) - train_scores.mean()) / train_scores.std()
    print(f"image scores z-scored and added: image AUROC {roc_auc_score(scorer.labels, fused.numpy()):.4f}", flush=True)


if __name__ == "__main__":
    main()
