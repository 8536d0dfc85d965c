"""dmgrd.metrics against scikit-learn and slow, obviously-correct references written here (own 8-connected
flood fill, one loop iteration per threshold); perfect and constant maps; bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, roc_auc_score

from dmgrd import metrics


@pytest.fixture
def rng(gen) -> np.random.Generator:
    return np.random.default_rng(gen.initial_seed())


def random_scores(rng, size, kind: str, dtype=np.float64) -> np.ndarray:
    """Scores that are continuous, heavily tied, or signed with ties and both zeros (-0.0 and +0.0)."""
    if kind == "ties":
        scores = rng.integers(0, 5, size).astype(np.float64)
    elif kind == "signed":
        scores = np.round(rng.standard_normal(size), 1)
        scores.flat[:4] = [-0.0, 0.0, -0.0, 0.0]
    else:
        scores = rng.random(size)
    return scores.astype(dtype)


def random_labels(rng, size) -> np.ndarray:
    labels = rng.random(size) < 0.3
    labels.flat[:2] = [False, True]  # both classes
    return labels


def random_blob_masks(rng, count: int, size: int, diagonal: bool = False) -> np.ndarray:
    """[count, size, size] masks; the first two images and about half of the others but the last (always normal)
    hold 1-3 rectangles (and, with ``diagonal``, a staircase of pixels touching only at corners)."""
    masks = np.zeros((count, size, size), dtype=bool)
    for image in range(count - 1):
        if image >= 2 and rng.random() < 0.5:
            continue
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, size - 1, 2)
            height, width = rng.integers(1, 5, 2)
            masks[image, top:top + height, left:left + width] = True
        if diagonal:
            start = rng.integers(0, size - 4)
            steps = np.arange(4)
            masks[image, start + steps, start + steps] = True
    return masks


def informative_maps(rng, masks: np.ndarray, kind: str = "continuous") -> np.ndarray:
    """Noise plus a random boost on anomalous pixels: better than chance, far from perfect. "ties" rounds to 0.1;
    "floor" puts about 3/4 of the normal pixels exactly at the minimum, so the lowest RD threshold is kept."""
    noise = np.maximum(rng.random(masks.shape), 0.75) if kind == "floor" else rng.random(masks.shape)
    maps = noise + 0.6 * masks * rng.random(masks.shape)
    return np.round(maps, 1) if kind == "ties" else maps


def flood_fill_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a 2-D boolean mask, each as a boolean mask."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, region = [start], np.zeros_like(mask)
        while stack:
            row, col = stack.pop()
            region[row, col] = True
            for next_row in range(max(row - 1, 0), min(row + 2, height)):
                for next_col in range(max(col - 1, 0), min(col + 2, width)):
                    if mask[next_row, next_col] and not seen[next_row, next_col]:
                        seen[next_row, next_col] = True
                        stack.append((next_row, next_col))
        regions.append(region)
    return regions


def mean_overlap(predicted: np.ndarray, regions: list[np.ndarray]) -> float:
    return float(np.mean([predicted[region].mean() for region in regions]))


def reference_pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[list[float], list[float]]:
    """Official curve: (0, 0), then one point per distinct score t, descending, predicting ``score >= t``."""
    regions = [(image, region) for image in range(len(masks)) for region in flood_fill_regions(masks[image])]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append(predicted[~masks].mean())
        pros.append(float(np.mean([predicted[image][region].mean() for image, region in regions])))
    return fprs, pros


def reference_area(xs: list[float], ys: list[float], limit: float) -> float:
    """Trapezoid area for x in [0, limit], cutting the segment that crosses the limit by linear interpolation."""
    area = 0.0
    for (x0, x1), (y0, y1) in zip(itertools.pairwise(xs), itertools.pairwise(ys), strict=True):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def reference_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_pos = np.sum(predicted & labels)
        precision = true_pos / np.sum(predicted)
        recall = true_pos / np.sum(labels)
        if precision + recall > 0:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def reference_rd_pro(maps: np.ndarray, masks: np.ndarray, limit: float, num_thresholds: int) -> float:
    """RD4AD ``compute_pro`` as SPEC §2 variant 3 describes it, one image and one threshold at a time."""
    areas = []
    for scores, mask in zip(maps, masks, strict=True):
        regions = flood_fill_regions(mask)
        if not regions:
            continue
        low, high = scores.min(), scores.max()
        points = []
        for threshold in np.arange(low, high, (high - low) / num_thresholds):
            predicted = scores > threshold
            points.append((predicted[~mask].mean(), mean_overlap(predicted, regions)))
        kept = [(fpr, pro) for fpr, pro in points if fpr < limit]
        largest = max(fpr for fpr, _ in kept)
        areas.append(auc([fpr / largest for fpr, _ in kept], [pro for _, pro in kept]))
    return float(np.mean(areas))


@pytest.mark.parametrize("kind", ["continuous", "ties", "signed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_auroc_matches_sklearn(rng, kind, dtype, as_tensor):
    convert = torch.from_numpy if as_tensor else np.asarray
    scores, labels = random_scores(rng, 200, kind, dtype), random_labels(rng, 200)
    maps, masks = random_scores(rng, (3, 1, 17, 19), kind, dtype), random_labels(rng, (3, 1, 17, 19))
    assert metrics.image_auroc(convert(scores), convert(labels)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.pixel_auroc(convert(maps), convert(masks)) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_auroc_of_half_precision_tensors(rng):
    maps = torch.from_numpy(random_scores(rng, (2, 9, 9), "continuous")).to(torch.bfloat16)
    masks = torch.from_numpy(random_labels(rng, (2, 9, 9)))
    expected = roc_auc_score(masks.numpy().ravel(), maps.float().numpy().ravel())
    assert metrics.pixel_auroc(maps, masks.float()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ["continuous", "ties", "signed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_f1_max_matches_reference(rng, kind, dtype):
    scores, labels = random_scores(rng, 150, kind, dtype), random_labels(rng, 150)
    assert metrics.f1_max(scores, labels) == pytest.approx(reference_f1_max(scores, labels), abs=1e-12)
    maps, masks = random_scores(rng, (2, 1, 11, 13), kind, dtype), random_labels(rng, (2, 1, 11, 13))
    expected = reference_f1_max(maps.ravel(), masks.ravel())
    assert metrics.f1_max(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", ["continuous", "ties", "diagonal"])
@pytest.mark.parametrize("fpr_limit", [0.3, 1.0, 0.05])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_matches_reference(rng, case, fpr_limit, dtype):
    masks = random_blob_masks(rng, 4, 12, diagonal=case == "diagonal")
    maps = informative_maps(rng, masks, "ties" if case == "ties" else "continuous").astype(dtype)
    expected = reference_area(*reference_pro_curve(maps, masks), fpr_limit) / fpr_limit
    assert metrics.aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_regions_are_8_connected():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True  # 4 pixels, found
    masks[0, 3, 3] = True  # touches the block only at a corner, missed
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 1:3, 1:3] = 1.0
    # One region of 5 pixels with 4 found: PRO 0.8 from FPR 0 on. Two 4-connected regions would give 0.5.
    assert metrics.aupro(maps, masks) == pytest.approx(0.8, abs=1e-12)


def test_aupro_full_dmgrd_is_the_unnormalised_full_area(rng):
    masks = random_blob_masks(rng, 6, 16)
    maps = informative_maps(rng, masks)
    full = metrics.aupro_full_dmgrd(maps, masks)
    assert full == metrics.aupro(maps, masks, fpr_limit=1.0) * 1.0
    assert full == pytest.approx(reference_area(*reference_pro_curve(maps, masks), 1.0), abs=1e-9)
    assert full > metrics.aupro(maps, masks, fpr_limit=0.3)


@pytest.mark.parametrize("kind", ["continuous", "ties", "floor"])
@pytest.mark.parametrize("fpr_limit,num_thresholds", [(0.3, 200), (0.5, 17)])
def test_pro_per_image_rd_matches_reference(rng, kind, fpr_limit, num_thresholds):
    masks = random_blob_masks(rng, 5, 12, diagonal=True)
    maps = informative_maps(rng, masks, kind)
    expected = reference_rd_pro(maps, masks, fpr_limit, num_thresholds)
    got = metrics.pro_per_image_rd(torch.from_numpy(maps)[:, None], masks[:, None], fpr_limit, num_thresholds)
    assert got == pytest.approx(expected, abs=1e-9)


def test_perfect_maps_score_one(rng):
    masks = random_blob_masks(rng, 5, 16)
    maps = masks * 0.7 + 0.1
    labels = masks.any(axis=(1, 2))
    assert metrics.aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro_full_dmgrd(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pixel_auroc(maps, masks) == 1.0
    assert metrics.f1_max(maps, masks) == 1.0
    assert metrics.image_auroc(labels * 2.0, labels) == 1.0
    assert metrics.f1_max(labels * 2.0, labels) == 1.0


def test_constant_maps_give_chance_values(rng):
    masks = random_blob_masks(rng, 5, 16)
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    positives, negatives = masks.sum(), (~masks).sum()
    # A single threshold: the curve jumps from (0, 0) to (1, 1), a straight line.
    assert metrics.aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert metrics.f1_max(maps, masks) == pytest.approx(2 * positives / (2 * positives + negatives), abs=1e-12)
    with pytest.raises(ValueError, match="map 0 is constant"):
        metrics.pro_per_image_rd(maps, masks)


def test_pro_per_image_rd_rejects_perfect_separation(rng):
    masks = random_blob_masks(rng, 3, 16)
    with pytest.raises(ValueError, match="divides by zero"):
        metrics.pro_per_image_rd(masks * 1.0, masks)


def test_compute_metrics_names_and_values(rng):
    masks = random_blob_masks(rng, 6, 16)
    maps = torch.from_numpy(informative_maps(rng, masks, "ties")).float()[:, None]
    labels = torch.from_numpy(masks.any(axis=(1, 2)))
    scores = maps.amax(dim=(1, 2, 3))
    got = metrics.compute_metrics(scores, labels, maps, torch.from_numpy(masks)[:, None], fpr_limit=0.2)
    assert got == {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "pixel_aupro": metrics.aupro(maps, masks, fpr_limit=0.2),
        "image_f1max": metrics.f1_max(scores, labels),
        "pixel_f1max": metrics.f1_max(maps, masks),
    }
    assert all(isinstance(value, float) for value in got.values())


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="maps and masks differ in shape"):
        metrics.aupro(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match=r"maps must be \[N, H, W\]"):
        metrics.pixel_auroc(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="scores and labels differ in length"):
        metrics.image_auroc(np.zeros(4), np.array([0, 1, 0]))


def test_non_binary_masks_are_rejected():
    masks = np.zeros((1, 4, 4))
    masks[0, 0, :2] = [1.0, 0.5]
    with pytest.raises(ValueError, match="masks must be binary"):
        metrics.aupro(np.zeros((1, 4, 4)), masks)
    with pytest.raises(ValueError, match="labels must be binary"):
        metrics.image_auroc(np.zeros(3), np.array([0, 1, 2]))


def test_single_class_is_rejected():
    with pytest.raises(ValueError, match=r"labels contain a single class \(1\); AUROC is undefined"):
        metrics.image_auroc(np.arange(3.0), np.ones(3))
    with pytest.raises(ValueError, match=r"masks contain a single class \(0\); AUROC is undefined"):
        metrics.pixel_auroc(np.random.rand(2, 4, 4), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no anomalous"):
        metrics.f1_max(np.arange(3.0), np.zeros(3))


@pytest.mark.parametrize("pro", [metrics.aupro, metrics.aupro_full_dmgrd, metrics.pro_per_image_rd])
def test_pro_without_anomalous_pixel_is_rejected(pro):
    with pytest.raises(ValueError, match="no anomalous pixel; PRO is undefined"):
        pro(np.random.rand(2, 4, 4), np.zeros((2, 4, 4)))


def test_aupro_without_normal_pixel_is_rejected():
    with pytest.raises(ValueError, match="no normal pixel"):
        metrics.aupro(np.random.rand(2, 4, 4), np.ones((2, 4, 4)))


def test_nan_is_rejected():
    scores = np.array([0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="scores contain NaN"):
        metrics.image_auroc(scores, np.array([0, 1, 1]))
    maps = torch.rand(2, 1, 4, 4)
    maps[1, 0, 2, 2] = float("nan")
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, 1, 1] = 1
    for metric in (metrics.pixel_auroc, metrics.aupro, metrics.pro_per_image_rd, metrics.compute_metrics):
        with pytest.raises(ValueError, match="maps contain NaN"):
            metric(maps, masks) if metric is not metrics.compute_metrics else metric(scores, [0, 1, 1], maps, masks)
    with pytest.raises(ValueError, match="scores contain NaN"):
        metrics.f1_max(maps, masks)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5])
def test_fpr_limit_out_of_range_is_rejected(fpr_limit):
    masks = np.zeros((1, 4, 4))
    masks[0, 0, 0] = 1
    for pro in (metrics.aupro, metrics.pro_per_image_rd):
        with pytest.raises(ValueError, match="fpr_limit must be in"):
            pro(np.random.rand(1, 4, 4), masks, fpr_limit)
