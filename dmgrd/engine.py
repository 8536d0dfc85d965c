"""Training and evaluation loops shared by every method."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm


def warmup_cosine(step: int, total: int, warmup: int, max_lr: float, min_lr: float) -> float:
    """Learning rate at ``step``: linear from ``min_lr`` to ``max_lr`` over ``warmup`` steps, then a cosine back
    down to ``min_lr`` at ``total`` (the official ``CosineAnnealingWarmupRestarts``, one cycle; SPEC §4.6)."""
    if step < warmup:
        return min_lr + (max_lr - min_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batches(data, batch_size: int, generator: torch.Generator, num_workers: int) -> Iterator[dict]:
    sampler = RandomSampler(data, generator=generator)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=len(data) >= batch_size)
    while True:
        yield from loader


def fit(model, train_data, steps: int = 1000, batch_size: int = 8, seed: int | None = None, num_workers: int = 0,
        progress: bool = True) -> list[dict[str, float]]:
    """Train ``model`` on normal images for ``steps`` optimiser steps and return the per-step losses.

    Builds the model's data-dependent state first (memory banks), then runs Adam with the config's lr and
    betas under a warm-up + cosine schedule, with bf16 autocast on CUDA. Randomness (batch order,
    synthesis, memory items) comes from one generator seeded with ``seed`` (default: the config's), so
    two runs with the same seed give the same losses. The model ends in eval mode.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    config = model.config
    generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    device = model.device
    model.train()
    model.prepare(train_data, generator, batch_size)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=config.lr, betas=tuple(config.betas))
    warmup = int(config.warmup_fraction * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, warmup, config.lr, config.min_lr) / config.lr)
    batches = _batches(train_data, batch_size, generator, num_workers)
    history = []
    bar = tqdm(range(steps), desc=f"training {model.method}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        images = next(batches)["image"].to(device, non_blocking=True)
        if not torch.isfinite(images).all():
            raise ValueError(f"training batch at step {step} contains NaN or infinite pixel values")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = model.training_losses(images, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        schedule.step()
        record = {name: float(value.detach()) for name, value in losses.items()}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"training diverged at step {step}: loss {record['loss']}")
        record["lr"] = optimizer.param_groups[0]["lr"]
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    model.eval()
    return history


@torch.inference_mode()
def predict(model, data, batch_size: int = 16, num_workers: int = 0, progress: bool = True):
    """Scores [N], labels [N], maps [N, 1, H, W] and masks [N, 1, H, W] (CPU) over a data set."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, labels, maps, masks = [], [], [], []
    for batch in tqdm(loader, desc="scoring", disable=not progress, dynamic_ncols=True):
        out = model(batch["image"].to(model.device))
        scores.append(out.score.float().cpu())
        maps.append(out.anomaly_map.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(batch["mask"])
    return torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks)


def evaluate(model, test_data, batch_size: int = 16, num_workers: int = 0, progress: bool = True) -> dict[str, float]:
    """Image AUROC (scores vs labels) and pixel AUROC (maps vs masks, every pixel) with scikit-learn."""
    scores, labels, maps, masks = predict(model, test_data, batch_size, num_workers, progress)
    if labels.unique().numel() < 2:
        raise ValueError("test data needs both normal and anomalous images to compute AUROC")
    pixel_truth = masks.flatten().numpy().astype(np.uint8)
    return {
        "image_auroc": float(roc_auc_score(labels.numpy(), scores.numpy())),
        "pixel_auroc": float(roc_auc_score(pixel_truth, maps.flatten().numpy())),
    }
