"""Pictures of results: colour-mapped anomaly maps, overlays, masks, result panels, ROC and PRO curves."""

from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from dmgrd import metrics

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


def map_range(maps: torch.Tensor) -> tuple[float, float]:
    """The 1 % and 99.9 % quantiles of the values of ``maps`` (of at most about 1 M of them, evenly strided): a
    colour scale that outliers do not squash."""
    flat = maps.flatten().float()
    if flat.numel() > 1_000_000:
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    return float(flat.quantile(0.01)), float(flat.quantile(0.999))


def mask_image(mask: torch.Tensor) -> np.ndarray:
    """A binary [H, W] (or [1, H, W]) mask, values > 0.5 counting as set -> H x W x 3 uint8, white where set."""
    binary = mask.detach().float().squeeze(0).cpu().numpy() > 0.5
    return np.repeat(binary[..., None] * 255, 3, axis=2).astype(np.uint8)


def result_panel(image: torch.Tensor, anomaly_map: torch.Tensor, vmin: float, vmax: float,
                 mask: torch.Tensor | None = None) -> np.ndarray:
    """image | anomaly map | overlay | ground truth (when given), side by side, 4 px apart."""
    tiles = [to_uint8_image(image), colorize(anomaly_map, vmin, vmax), overlay(image, anomaly_map, vmin, vmax)]
    if mask is not None:
        tiles.append(mask_image(mask))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = [tiles[0]]
    for tile in tiles[1:]:
        row += [gap, tile]
    return np.concatenate(row, axis=1)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an H x W (x 3) uint8 array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def save_roc_plot(labels: np.ndarray, scores: np.ndarray, path: str | Path, title: str = "") -> None:
    """Image-level ROC curve (:func:`dmgrd.metrics.roc_curve`) with its AUROC in the legend."""
    fpr, tpr = metrics.roc_curve(scores, labels)
    save_curve_plot(fpr, tpr, path, f"AUROC {metrics.image_auroc(scores, labels):.4f}", "false positive rate",
                    "true positive rate", title, diagonal=True)


def save_pro_plot(maps: metrics.ArrayLike, masks: metrics.ArrayLike, path: str | Path, title: str = "",
                  fpr_limit: float = 0.3) -> None:
    """The official per-region-overlap curve (:func:`dmgrd.metrics.pro_curve`) up to ``fpr_limit``, with its
    normalised area (``aupro``) in the legend; drawn through 500 points evenly spaced in FPR."""
    fpr, pro = metrics.pro_curve(maps, masks)
    shown = np.linspace(0, fpr_limit, 500)
    save_curve_plot(shown, np.interp(shown, fpr, pro), path,
                    f"AUPRO@{fpr_limit:g} {metrics.aupro(maps, masks, fpr_limit):.4f}", "false positive rate",
                    "per-region overlap", title, xlim=(0, fpr_limit))


def save_curve_plot(x: np.ndarray, y: np.ndarray, path: str | Path, label: str, xlabel: str, ylabel: str,
                    title: str = "", xlim: tuple[float, float] = (0, 1), diagonal: bool = False) -> None:
    """One curve (y in [0, 1]) as a 4 x 4 inch PNG, ``label`` in the legend; ``diagonal`` adds the chance line."""
    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    axes.plot(x, y, label=label)
    if diagonal:
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=xlim, ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
