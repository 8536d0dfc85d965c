"""Pictures of results: colour-mapped anomaly maps, overlays, result panels and ROC curves."""

from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> H x W x 3 uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def colorize(anomaly_map: torch.Tensor, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """[H, W] (or [1, H, W]) scores -> H x W x 3 uint8 through a matplotlib colour map, scaled to [vmin, vmax]."""
    values = anomaly_map.detach().float().squeeze(0).cpu().numpy()
    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay(image: torch.Tensor, anomaly_map: torch.Tensor, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """The colour-mapped anomaly map blended over the image."""
    base = to_uint8_image(image).astype(np.float32)
    heat = colorize(anomaly_map, vmin, vmax).astype(np.float32)
    return ((1 - alpha) * base + alpha * heat).round().astype(np.uint8)


def result_panel(image: torch.Tensor, anomaly_map: torch.Tensor, vmin: float, vmax: float,
                 mask: torch.Tensor | None = None) -> np.ndarray:
    """image | anomaly map | overlay | ground truth (when given), side by side, 4 px apart."""
    tiles = [to_uint8_image(image), colorize(anomaly_map, vmin, vmax), overlay(image, anomaly_map, vmin, vmax)]
    if mask is not None:
        tiles.append(np.repeat((mask.detach().float().squeeze(0).cpu().numpy() > 0.5)[..., None] * 255, 3, axis=2)
                     .astype(np.uint8))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = [tiles[0]]
    for tile in tiles[1:]:
        row += [gap, tile]
    return np.concatenate(row, axis=1)


def save_png(array: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def save_roc_plot(labels: np.ndarray, scores: np.ndarray, path: str | Path, title: str = "") -> None:
    """Image-level ROC curve with its AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    axes.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, scores):.4f}")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
