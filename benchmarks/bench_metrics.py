"""Metrics on one MVTec-sized test category: 100 maps of 256² (CPU float32), about 40 % of them with blob masks.

sklearn's ``roc_auc_score`` on the same pixels is the baseline for ``pixel_auroc``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dmgrd import metrics

MAPS, SIZE = 100, 256


def blob_masks(rng: np.random.Generator) -> np.ndarray:
    """[MAPS, SIZE, SIZE] masks: about 40 % of the images hold 1-3 discs of radius 4-30."""
    rows, cols = np.ogrid[:SIZE, :SIZE]
    masks = np.zeros((MAPS, SIZE, SIZE), dtype=bool)
    for image in np.flatnonzero(rng.random(MAPS) < 0.4):
        for _ in range(rng.integers(1, 4)):
            row, col = rng.integers(0, SIZE, 2)
            masks[image] |= (rows - row) ** 2 + (cols - col) ** 2 <= rng.integers(4, 31) ** 2
    return masks


@pytest.fixture(scope="module")
def category() -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [MAPS, 1, SIZE, SIZE] (noise, raised on anomalous pixels) and their masks, as ``engine.predict`` gives."""
    rng = np.random.default_rng(0)
    masks = blob_masks(rng)
    maps = rng.standard_normal(masks.shape, dtype=np.float32) + masks
    return torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None]


def sklearn_pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    return roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())


def record_rates(benchmark) -> None:
    """maps/s and megapixels/s from the benchmark's median time."""
    median = benchmark.stats.stats.median
    benchmark.extra_info["maps_per_s"] = round(MAPS / median, 1)
    benchmark.extra_info["megapixels_per_s"] = round(MAPS * SIZE * SIZE / median / 1e6, 2)


@pytest.mark.parametrize("metric,rounds", [
    pytest.param(metrics.aupro, 5, id="aupro_0.3"),
    pytest.param(metrics.pro_per_image_rd, 3, id="pro_per_image_rd"),
    pytest.param(metrics.pixel_auroc, 5, id="pixel_auroc"),
    pytest.param(sklearn_pixel_auroc, 1, id="sklearn_roc_auc_score"),
])
def test_metric(benchmark, category, metric, rounds):
    benchmark.group = f"metrics cpu {MAPS}x{SIZE}x{SIZE}"
    benchmark.pedantic(metric, args=category, rounds=rounds, iterations=1, warmup_rounds=1)
    record_rates(benchmark)
