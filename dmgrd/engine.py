"""Running trained models over data: predictions, metrics, decision thresholds, the validation split. The
training loop is :func:`dmgrd.models.training.fit` (``model.fit``), re-exported here as ``engine.fit``."""

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dmgrd.metrics import compute_metrics
from dmgrd.models.training import fit

__all__ = ["Results", "calibrate_thresholds", "category_metrics", "evaluate", "fit", "predict", "split_validation"]


@dataclass
class Results:
    """Model outputs over a data set (CPU tensors): scores [N], labels [N], maps and masks [N, 1, H, W], paths,
    and each item's category when the data set says it (:class:`dmgrd.data.Categories`; else empty)."""

    scores: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor
    paths: list[str]
    categories: list[str] = field(default_factory=list)

    def of_category(self, category: str) -> "Results":
        """The items of ``category``, in order."""
        index = [i for i, c in enumerate(self.categories) if c == category]
        if not index:
            raise ValueError(f"no results of category {category!r} (categories: {sorted(set(self.categories))})")
        keep = torch.tensor(index)
        return Results(self.scores[keep], self.labels[keep], self.maps[keep], self.masks[keep],
                       [self.paths[i] for i in index], [category] * len(index))


@torch.inference_mode()
def predict(model, data, batch_size: int = 16, num_workers: int = 0, progress: bool = True) -> Results:
    """Run ``model`` over every item of ``data`` (dicts with ``image``, ``mask``, ``label``, ``path``)."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, labels, maps, masks, paths, categories = [], [], [], [], [], []
    for batch in tqdm(loader, desc="scoring", disable=not progress, dynamic_ncols=True):
        out = model(batch["image"].to(model.device))
        scores.append(out.score.float().cpu())
        maps.append(out.anomaly_map.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(batch["mask"])
        paths += list(batch["path"])
        categories += list(batch.get("category", []))
    return Results(torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks), paths, categories)


def calibrate_thresholds(model, validation, quantile: float = 0.999, batch_size: int = 16, num_workers: int = 0,
                         progress: bool = False) -> dict[str, float]:
    """Set ``model``'s decision thresholds from held-out normal images and return them: the image threshold is
    the largest validation score, the pixel threshold the ``quantile`` of the validation map values (of at most
    10 M of them, drawn with a fixed seed). Saved with the model together with the range of the validation
    scores (for the normalised score of :class:`dmgrd.infer.Inferencer`); see :attr:`AnomalyModel.thresholds`
    and :attr:`AnomalyModel.score_range`.

    When the items name their category (:class:`dmgrd.data.Categories`), each category also gets its own
    thresholds, from its own validation images (:attr:`AnomalyModel.category_thresholds`)."""
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if len(validation) == 0:
        raise ValueError("validation is empty: thresholds need held-out normal images")
    results = predict(model, validation, batch_size, num_workers, progress=progress)
    low, high = (float(v) for v in torch.aminmax(results.scores))
    model.set_thresholds(*_thresholds(results, quantile), score_range=(low, high))
    for category in dict.fromkeys(results.categories):
        model.set_thresholds(*_thresholds(results.of_category(category), quantile), category=category)
    return model.thresholds


def _thresholds(results: Results, quantile: float) -> tuple[float, float]:
    """(the largest score, the ``quantile`` of at most 10 M map values drawn with a fixed seed)."""
    pixels = results.maps.flatten()
    if pixels.numel() > 10_000_000:
        pixels = pixels[torch.randperm(pixels.numel(), generator=torch.Generator().manual_seed(0))[:10_000_000]]
    return float(results.scores.max()), float(torch.quantile(pixels, quantile))


def evaluate(model, test_data, batch_size: int = 16, num_workers: int = 0, progress: bool = True) -> dict[str, float]:
    """Image and pixel AUROC, AUPRO@0.3 (MVTec definition) and image/pixel F1-max of ``model`` on ``test_data``."""
    return _metrics(predict(model, test_data, batch_size, num_workers, progress))


def category_metrics(results: Results) -> dict[str, dict[str, float]]:
    """The metrics of :func:`dmgrd.metrics.compute_metrics` per category, in order of first appearance; empty
    when the results have no categories."""
    return {category: _metrics(results.of_category(category)) for category in dict.fromkeys(results.categories)}


def _metrics(results: Results) -> dict[str, float]:
    return compute_metrics(results.scores, results.labels, results.maps, results.masks)


def split_validation(data, fraction: float, seed: int) -> tuple:
    """``(train, validation)`` subsets: a seeded random ``fraction`` of the normal training images is held out
    (for :func:`calibrate_thresholds`); ``(data, None)`` when the fraction rounds to no image."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    count = round(fraction * len(data))
    if count == 0:
        return data, None
    if count >= len(data):
        raise ValueError(f"a validation fraction of {fraction} leaves no training images out of {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(data, order[count:]), Subset(data, order[:count])
