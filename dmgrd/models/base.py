"""What every method shares: the frozen teacher, the one forward pass (images -> :class:`Prediction`), input
checks, decision thresholds, fit and save."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dmgrd.models import training
from dmgrd.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save
from dmgrd.models.config import ModelConfig
from dmgrd.models.optimize import optimize
from dmgrd.models.state import data_buffers, register_data_buffer
from dmgrd.models.teacher import Teacher

# Pixel values model(images) accepts: [0, 1] with room for resampling overshoot; 0-255 or normalised images fail.
IMAGE_RANGE = (-0.5, 1.5)
METHODS: dict[str, type[AnomalyModel]] = {}


@dataclass(frozen=True)
class Prediction:
    """Per-pixel anomaly map [B, 1, H, W] and image score [B] of a batch."""

    anomaly_map: torch.Tensor
    score: torch.Tensor


class AnomalyModel(nn.Module):
    """Base of every method: a frozen teacher, the forward pass, thresholds, fit and save.

    ``Method(backbone="wide_resnet50_2", weights="imagenet", preset="clean", image_size=256, **options)``:
    the options are fields of the method's ``config_class`` on top of the preset's values (or pass a whole
    ``config``). Subclasses set ``method`` and ``config_class``, build their parts in ``__init__`` from
    ``self.config``, and implement :meth:`score` and :meth:`training_losses` (and :meth:`prepare` when training
    needs data-built state such as memory banks).
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    # False for a method whose prepare() builds the whole model (fit() then runs no optimiser steps).
    needs_training: ClassVar[bool] = True
    # True after optimize(): BatchNorm is folded, so the model predicts but can neither train nor be saved.
    optimized: bool = False
    config: ModelConfig
    teacher: Teacher
    image_threshold: torch.Tensor
    pixel_threshold: torch.Tensor
    normal_score_range: torch.Tensor

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):  # a subclass that names no method of its own registers nothing
            METHODS[cls.method] = cls

    def __init__(self, backbone: str = "wide_resnet50_2", weights: str | None = "imagenet", preset: str = "clean",
                 image_size: int | tuple[int, int] = 256, *, config: ModelConfig | None = None, **options: Any):
        super().__init__()
        if config is None:
            config = self.config_class.from_preset(preset, backbone=backbone, weights=weights, image_size=image_size,
                                                   **options)
        height, width = config.size
        if height % 32 or width % 32:
            raise ValueError(f"image_size must be a multiple of 32 in both dimensions, got {config.image_size}")
        self.config = config
        self.teacher = Teacher(config.backbone, config.weights)
        # Decision thresholds on the image score and the map, chosen on held-out normal images (NaN: not set).
        register_data_buffer(self, "image_threshold", torch.tensor(float("nan")))
        register_data_buffer(self, "pixel_threshold", torch.tensor(float("nan")))
        # (min, max) of those images' scores, for the normalised score of dmgrd.infer (NaN: not recorded).
        register_data_buffer(self, "normal_score_range", torch.full((2,), float("nan")))
        # Unified (multi-class) training: thresholds per category, {category: {"image": .., "pixel": ..}}.
        self.category_thresholds: dict[str, dict[str, float]] = {}

    # -- to implement -------------------------------------------------------------------------------
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[B, 1, H, W]`` and image scores ``[B]`` of checked images (the method's forward)."""
        raise NotImplementedError

    def training_losses(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss terms of one training step; ``"loss"`` is the one optimised."""
        raise NotImplementedError

    def prepare(self, train_data, generator: torch.Generator, batch_size: int = 8, build_memory: bool = True) -> None:
        """Data-dependent state built before training; ``build_memory=False`` skips what a distributed run
        broadcasts from rank 0 instead (memory banks). Nothing by default."""

    # -- shared ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def recomputed_modules(self) -> list[nn.Module]:
        """The trainable parts ``fit(checkpoint_activations=True)`` recomputes in the backward pass instead of
        keeping their activations (:mod:`dmgrd.models.recompute`); none by default."""
        return []

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Adam parameter groups; ``lr_scale`` multiplies the scheduled lr of its group (other keys, such as
        ``weight_decay``, are Adam's). One group of every trainable parameter by default."""
        return [{"params": self.trainable_parameters(), "lr_scale": 1.0}]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def thresholds(self) -> dict[str, float] | None:
        """The decision thresholds ``{"image": t_score, "pixel": t_map}``, or None when they were never set
        (:func:`dmgrd.engine.calibrate_thresholds`); a score or map value above its threshold is anomalous."""
        image, pixel = float(self.image_threshold), float(self.pixel_threshold)
        return None if math.isnan(image) or math.isnan(pixel) else {"image": image, "pixel": pixel}

    @property
    def score_range(self) -> tuple[float, float] | None:
        """``(min, max)`` of the held-out normal images' scores that set the thresholds, or None when not recorded;
        the normalised score of :class:`dmgrd.infer.Inferencer` maps the image threshold to 0.5 with them."""
        low, high = (float(v) for v in self.normal_score_range)
        return None if math.isnan(low) or math.isnan(high) else (low, high)

    @torch.no_grad()
    def set_thresholds(self, image: float, pixel: float, score_range: tuple[float, float] | None = None,
                       category: str | None = None) -> None:
        """Store the decision thresholds and, optionally, the ``(min, max)`` of the scores they came from (saved
        with the model); with ``category``, that category's thresholds (:meth:`thresholds_for`)."""
        values = {"image threshold": image, "pixel threshold": pixel}
        if score_range is not None:
            values.update(zip(("score minimum", "score maximum"), score_range, strict=True))
        for name, value in values.items():
            if not math.isfinite(value):
                raise ValueError(f"the {name} must be a finite number, got {value}")
        if score_range is not None and score_range[0] > score_range[1]:
            raise ValueError(f"the score range {score_range} must be (min, max)")
        if category is not None:
            self.category_thresholds[category] = {"image": float(image), "pixel": float(pixel)}
            return
        self.image_threshold.fill_(image)
        self.pixel_threshold.fill_(pixel)
        self.normal_score_range.copy_(torch.tensor(score_range or (math.nan, math.nan)))

    def thresholds_for(self, category: str | None) -> dict[str, float] | None:
        """The thresholds of ``category`` when it has its own (unified training over several categories),
        else :attr:`thresholds`."""
        return self.category_thresholds.get(category, self.thresholds) if category is not None else self.thresholds

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is a float [B, 3, H, W] batch on the model's device at its image
        size, finite and within :data:`IMAGE_RANGE`; the message names the problem and how to fix it."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a [B, 3, H, W] tensor in [0, 1] (model(images) also takes "
                             f"[B, 1, H, W] grayscale), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}: convert them first, "
                             f"e.g. images.float() / 255 for 8-bit images")
        if images.device != self.device:
            raise ValueError(f"images are on {images.device} but the model is on {self.device}: "
                             f"move them with images.to(model.device)")
        if tuple(images.shape[2:]) != self.config.size:
            raise ValueError(f"images are {tuple(images.shape[2:])} but the model expects image_size "
                             f"{self.config.size}; resize them (the dataset readers do)")
        if images.numel() == 0 or torch.jit.is_tracing():  # a traced graph (ONNX export) has no value checks
            return
        low, high = torch.aminmax(images)
        if not (low.isfinite() and high.isfinite()):
            raise ValueError("images contain NaN or infinite values")
        if low < IMAGE_RANGE[0] or high > IMAGE_RANGE[1]:
            raise ValueError(f"image values span [{low:.4g}, {high:.4g}] but must lie in [0, 1]: divide 8-bit "
                             f"values by 255, and do not normalise them (the teacher does)")

    def input_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as the networks take them: a [B, 1, H, W] grayscale batch repeated to three channels,
        checked by :meth:`check_images`, in the model's dtype and contiguous, so that results depend neither on
        the input's dtype (beyond rounding to the model's) nor on its memory format or strides."""
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.check_images(images)
        return images.to(next(self.parameters()).dtype).contiguous()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Prediction:
        """Anomaly maps and scores for a batch of [0, 1] images at ``image_size`` (no autograd graph): the one
        inference path, which evaluation, the CLI, the benchmarks and ONNX export all run (under
        ``torch.inference_mode`` after :meth:`optimize`)."""
        with torch.inference_mode() if self.optimized else contextlib.nullcontext():
            return Prediction(*self.score(self.input_images(images)))

    def optimize(self, *, channels_last: bool | None = None, window_gemm: bool | None = None,
                 compile: bool = False) -> AnomalyModel:
        """Make this fitted model a faster predictor, in place, and return it: eval mode, frozen weights,
        BatchNorm folded into the convolutions before it, channels_last weights (default: on CPU), the 1x1 and 3x3
        convolutions and the decoders' transposed convolutions of small grids as one GEMM each (default: with
        channels_last on CPU) and, with ``compile=True``,
        a ``torch.compile``d :meth:`score` (compiled on the first batch of each shape). Predictions match the
        plain model up to float rounding; an optimised model can no longer be trained or saved
        (:func:`dmgrd.models.optimize.optimize`)."""
        return optimize(self, channels_last=channels_last, window_gemm=window_gemm, compile=compile)

    def fit(self, train_data, steps: int = 1000, batch_size: int = 8, **kwargs: Any) -> list[dict[str, float]]:
        """Train on a data set of normal images (items with ``"image"``); see :func:`dmgrd.models.training.fit`."""
        return training.fit(self, train_data, steps=steps, batch_size=batch_size, **kwargs)

    def save(self, path: str | Path, **extra) -> None:
        """Write config, weights and buffers (memory banks, thresholds) to ``path`` atomically (write, then
        rename), with the names of the data-built buffers (:mod:`dmgrd.models.state`) that loading checks.

        ``extra`` entries (tensors, numbers, strings, lists and dicts of them) are stored beside the model,
        e.g. the training state for resuming; :func:`dmgrd.models.loading.read_checkpoint` returns them.
        """
        self._require_unoptimized("save")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "data_state": [name for name, _ in data_buffers(self)],
            **({"category_thresholds": self.category_thresholds} if self.category_thresholds else {}),
            **extra,
        }
        atomic_save(payload, Path(path))

    def _require_unoptimized(self, action: str) -> None:
        if self.optimized:
            raise RuntimeError(f"cannot {action} a model after optimize() (its BatchNorm layers are folded into "
                               f"the convolutions): {action} the model first, then call optimize() on it or on "
                               f"a loaded copy")
