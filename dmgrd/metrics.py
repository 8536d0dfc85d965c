"""Anomaly-detection metrics: image/pixel AUROC, F1-max and three incompatible PRO variants (SPEC §2).

Every public function accepts numpy arrays or torch tensors. Scores and labels are [N]; maps and masks are
[N, H, W] or [N, 1, H, W] with masks binary. The PRO variants answer different questions and their numbers
are not comparable with each other: always report which one was used.

- :func:`aupro` (``aupro_0.3``, the spec default): the MVTec AD official AUPRO.
- :func:`aupro_full_dmgrd` (``aupro_full_dmgrd``): DM-GRD's "PRO", the unnormalised area over FPR in [0, 1].
- :func:`pro_per_image_rd` (``pro_per_image_rd``): RD4AD / RD++ / DRD ``compute_pro``, averaged over images.

AUROC, F1-max and the official PRO curve are exact: one descending sort of all pixels, cumulative sums, and one
curve point per distinct score.
"""

import numpy as np
import torch
from scipy import ndimage

ArrayLike = np.ndarray | torch.Tensor

# 8-connectivity inside each [H, W] plane of an [N, H, W] stack, none across images.
_IN_PLANE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8_CONNECTED[1] = True


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level AUROC of ``scores`` [N] against ``labels`` [N] in {0, 1} (equals sklearn ``roc_auc_score``)."""
    scores, labels = _scores_and_labels(scores, labels)
    return _auroc(scores, labels, "labels")


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level AUROC over every pixel of every map (equals sklearn ``roc_auc_score`` on the flattened arrays)."""
    maps, masks = _maps_and_masks(maps, masks)
    return _auroc(maps.ravel(), masks.ravel(), "masks")


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """The largest F1 over all thresholds ``score >= t`` (a point of sklearn's ``precision_recall_curve``).

    Any shape is accepted and flattened, so ``f1_max(maps, masks)`` is the pixel-level F1-max. Points with
    precision = recall = 0 count as F1 = 0.
    """
    scores, labels = _scores_and_labels(scores, labels)
    if not labels.any():
        raise ValueError("labels contain no anomalous (1) entry; F1 is undefined")
    true_pos, false_pos = _cumulative_at_thresholds(scores, labels, ~labels)
    # F1 = 2TP / (2TP + FP + FN) with FN = positives - TP; never 0/0 because TP + FP >= 1 at every threshold.
    return float(np.max(2 * true_pos / (true_pos + false_pos + true_pos[-1])))


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """MVTec AD official AUPRO (``aupro_0.3`` in SPEC §2, variant 1), normalised to [0, 1].

    Regions are the 8-connected components of each mask; the exact PRO curve sweeps every distinct score as a
    threshold, FPR counts the normal pixels of all images and PRO is the mean overlap over all regions of all
    images. Returns the trapezoid area for FPR in [0, ``fpr_limit``] (the curve interpolated at the limit)
    divided by ``fpr_limit``. Not comparable with :func:`aupro_full_dmgrd` or :func:`pro_per_image_rd`.
    """
    _check_fpr_limit(fpr_limit)
    fpr, pro = _pro_curve(*_maps_and_masks(maps, masks))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_full_dmgrd(maps: ArrayLike, masks: ArrayLike) -> float:
    """DM-GRD's "PRO" (``aupro_full_dmgrd``, SPEC §2 variant 2): the official curve's area over all FPR in [0, 1].

    DM-GRD calls the official ``trapezoid`` without ``x_max``, so this equals ``aupro(..., fpr_limit=1.0)``. It is
    systematically much higher than AUPRO@0.3 and not comparable with any other variant. DM-GRD takes regions
    from every non-zero mask pixel: binarise masks with ``!= 0`` before calling this to reproduce its numbers.
    """
    return aupro(maps, masks, fpr_limit=1.0)


def pro_per_image_rd(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """RD4AD / RD++ / DRD ``compute_pro`` (``pro_per_image_rd``, SPEC §2 variant 3), averaged over anomalous images.

    For each image with at least one anomalous mask pixel: thresholds ``min + k * (max - min) / num_thresholds``
    for k = 0 .. num_thresholds - 1 over that image's map, pixels ``> t`` are positive, FPR counts that image's
    normal pixels, PRO is the mean overlap over that image's 8-connected regions; points with FPR < ``fpr_limit``
    are kept, their FPR is divided by the largest kept FPR (not by ``fpr_limit``) and the trapezoid area is taken.
    Not comparable with :func:`aupro` (it is typically lower) or :func:`aupro_full_dmgrd`.

    Raises ``ValueError`` for an image whose curve is undefined: a constant map, no normal pixel, fewer than two
    kept points (upstream crashes in all three) or a largest kept FPR of 0 (upstream returns NaN).
    """
    _check_fpr_limit(fpr_limit)
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    maps, masks = _maps_and_masks(maps, masks)
    anomalous = np.flatnonzero(masks.any(axis=(1, 2)))
    if anomalous.size == 0:
        raise ValueError("masks contain no anomalous pixel; PRO is undefined")
    return float(np.mean([_rd_image_pro(maps[i], masks[i], fpr_limit, num_thresholds, i) for i in anomalous.tolist()]))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact image ROC curve ``(FPR, TPR)`` over every distinct score, from (0, 0) to (1, 1)."""
    scores, labels = _scores_and_labels(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError("labels contain a single class; the ROC curve is undefined")
    true_pos, false_pos = _cumulative_at_thresholds(scores, labels, ~labels)
    return np.r_[0.0, false_pos / false_pos[-1]], np.r_[0.0, true_pos / true_pos[-1]]


def pro_curve(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact official per-region-overlap curve ``(FPR, PRO)`` (the curve :func:`aupro` integrates)."""
    return _pro_curve(*_maps_and_masks(maps, masks))


def compute_metrics(scores: ArrayLike, labels: ArrayLike, maps: ArrayLike, masks: ArrayLike,
                    fpr_limit: float = 0.3) -> dict[str, float]:
    """Image/pixel AUROC and F1-max, and ``pixel_aupro``: the official AUPRO (:func:`aupro`) at ``fpr_limit``."""
    maps, masks = _maps_and_masks(maps, masks)
    return {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "pixel_aupro": aupro(maps, masks, fpr_limit),
        "image_f1max": f1_max(scores, labels),
        "pixel_f1max": f1_max(maps, masks),
    }


def _auroc(scores: np.ndarray, positive: np.ndarray, name: str) -> float:
    """Area under the exact ROC curve, ties handled as sklearn does (one curve point per distinct score)."""
    if positive.all() or not positive.any():
        raise ValueError(f"{name} contain a single class ({int(positive[0])}); AUROC is undefined")
    true_pos, false_pos = _cumulative_at_thresholds(scores, positive, ~positive)
    return float(np.trapezoid(np.r_[0.0, true_pos / true_pos[-1]], np.r_[0.0, false_pos / false_pos[-1]]))


def _pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact official PRO curve (FPR, PRO) over every distinct score, from (0, 0) to (1, 1)."""
    inverse_area, regions = _inverse_region_areas(masks)
    if regions == 0:
        raise ValueError("masks contain no anomalous pixel; PRO is undefined")
    normal = ~masks
    normal_pixels = np.count_nonzero(normal)
    if normal_pixels == 0:
        raise ValueError("masks contain no normal pixel; the FPR of the PRO curve is undefined")
    false_pos, overlap = _cumulative_at_thresholds(maps.ravel(), normal.ravel(), inverse_area.ravel())
    return np.r_[0.0, false_pos / normal_pixels], np.r_[0.0, overlap / regions]


def _inverse_region_areas(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel, 1 / area of its 8-connected mask region (0 on normal pixels); and the number of regions."""
    labels, regions = ndimage.label(masks, structure=_IN_PLANE_8_CONNECTED)
    inverse = np.zeros(regions + 1)
    inverse[1:] = 1.0 / np.bincount(labels.ravel())[1:]
    return inverse[labels], regions


def _cumulative_at_thresholds(scores: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """For every distinct score t in descending order, the sum of each weight over the entries scoring >= t."""
    order = _descending_order(scores)
    ranked = scores[order]
    last_of_ties = np.append(ranked[1:] != ranked[:-1], True)
    return tuple(np.cumsum(weight[order], dtype=np.float64)[last_of_ties] for weight in weights)


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices that sort the 1-D float32/float64 ``scores`` descending (tied entries in any order)."""
    if scores.dtype != np.float32 or scores.size >= 2**32:
        return np.argsort(scores)[::-1]
    # Sorting (score key, index) packed into uint64 uses numpy's SIMD sort: about 6x faster than argsort.
    bits = scores.view(np.uint32)
    ascending_key = np.where(bits >= np.uint32(1 << 31), ~bits, bits | np.uint32(1 << 31))
    packed = (~ascending_key).astype(np.uint64) << np.uint64(32) | np.arange(scores.size, dtype=np.uint64)
    return (np.sort(packed) & np.uint64(0xFFFFFFFF)).astype(np.intp)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing, for x in [x[0], x_max] (interpolated at x_max)."""
    end = np.searchsorted(x, x_max, side="right")
    x_kept, y_kept = x[:end], y[:end]
    if end < len(x) and x_kept[-1] < x_max:
        y_at_limit = np.interp(x_max, x[end - 1:end + 1], y[end - 1:end + 1])
        x_kept, y_kept = np.append(x_kept, x_max), np.append(y_kept, y_at_limit)
    return float(np.trapezoid(y_kept, x_kept))


def _rd_image_pro(scores: np.ndarray, mask: np.ndarray, fpr_limit: float, num_thresholds: int, index: int) -> float:
    """RD4AD's per-image PRO area of image ``index`` (see :func:`pro_per_image_rd`)."""
    scores = scores.astype(np.float64)
    low, high = scores.min(), scores.max()
    if low == high:
        raise ValueError(f"map {index} is constant; the per-image RD PRO has no thresholds to sweep")
    normal = ~mask
    if not normal.any():
        raise ValueError(f"mask {index} has no normal pixel; its FPR is undefined")
    thresholds = np.arange(low, high, (high - low) / num_thresholds)
    inverse_area, regions = _inverse_region_areas(mask[None])
    fpr = _weight_above(scores[normal], thresholds) / np.count_nonzero(normal)
    pro = _weight_above(scores[mask], thresholds, inverse_area[0][mask]) / regions
    kept = fpr < fpr_limit
    if np.count_nonzero(kept) < 2:
        raise ValueError(f"image {index}: fewer than two thresholds give FPR < {fpr_limit}; the RD PRO is undefined")
    largest_fpr = fpr[kept].max()
    if largest_fpr == 0:
        raise ValueError(f"image {index}: every threshold with FPR < {fpr_limit} has FPR 0, so the RD rescaling "
                         "divides by zero (the map separates the image perfectly)")
    # fpr falls as the threshold rises: reverse to integrate over increasing x.
    return float(np.trapezoid(pro[kept][::-1], fpr[kept][::-1] / largest_fpr))


def _weight_above(values: np.ndarray, thresholds: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """For each of the ascending ``thresholds``, the (weighted) count of ``values`` strictly above it."""
    thresholds_below = np.searchsorted(thresholds, values, side="left")
    counts = np.bincount(thresholds_below, weights=weights, minlength=len(thresholds) + 1)
    return np.cumsum(counts[::-1])[::-1][1:]


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _scores_and_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float scores and boolean labels of the same length, validated."""
    scores, labels = _float_array(scores, "scores").ravel(), _binary_array(labels, "labels").ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    return scores, labels


def _maps_and_masks(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Float maps and boolean masks as [N, H, W], validated to have the same shape."""
    maps, masks = _stack(_float_array(maps, "maps"), "maps"), _stack(_binary_array(masks, "masks"), "masks")
    if maps.shape != masks.shape:
        raise ValueError(f"maps and masks differ in shape: {maps.shape} vs {masks.shape}")
    return maps, masks


def _stack(array: np.ndarray, name: str) -> np.ndarray:
    """[N, H, W] view of an [N, H, W] or [N, 1, H, W] array."""
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W] or [N, 1, H, W], got shape {tuple(array.shape)}")
    return array


def _float_array(values: ArrayLike, name: str) -> np.ndarray:
    """Finite float32 (floats of up to 32 bits) or float64 (anything else) numpy copy or view of ``values``."""
    array = _numpy(values)
    array = array.astype(np.float32 if array.dtype.kind == "f" and array.itemsize <= 4 else np.float64, copy=False)
    if array.size == 0:
        raise ValueError(f"{name} are empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def _binary_array(values: ArrayLike, name: str) -> np.ndarray:
    """Boolean numpy version of ``values``, which must hold only 0 and 1."""
    array = _numpy(values)
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be binary (only 0 and 1); binarise soft masks first, e.g. mask > 0.5")
    return array.astype(bool, copy=False)


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point() and values.dtype != torch.float64:
            values = values.float()  # numpy has no bfloat16
        return values.numpy()
    return np.asarray(values)
