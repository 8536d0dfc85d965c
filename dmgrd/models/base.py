"""What every method shares: config with presets, the scoring forward pass, fit, save and load."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dmgrd import ops
from dmgrd.losses import KD_REDUCTIONS
from dmgrd.models.state import data_buffers, register_data_buffer
from dmgrd.models.teacher import Teacher
from dmgrd.ops.image_score import MODES as IMAGE_SCORE_MODES

# "warmup_cosine": linear warm-up to lr, cosine down to min_lr (DM-GRD); "constant": lr throughout (RD4AD,
# RD++ and DRD code have no scheduler).
SCHEDULES = ("warmup_cosine", "constant")

CHECKPOINT_FORMAT = "dmgrd-checkpoint"
CHECKPOINT_VERSION = 1
# Pixel values model(images) accepts: [0, 1] with room for resampling overshoot; 0-255 or normalised images fail.
IMAGE_RANGE = (-0.5, 1.5)
METHODS: dict[str, type[AnomalyModel]] = {}


@dataclass(frozen=True)
class Prediction:
    """Per-pixel anomaly map [B, 1, H, W] and image score [B] of a batch."""

    anomaly_map: torch.Tensor
    score: torch.Tensor


@dataclass
class ModelConfig:
    """Settings every method shares. ``preset`` names the defaults the method's presets filled in."""

    backbone: str = "wide_resnet50_2"
    weights: str | None = "imagenet"
    preset: str = "clean"
    image_size: int | tuple[int, int] = 256
    kd_reduction: str = "flatten"
    image_score: str = "max"
    topk: int = 100
    sigma: float = 4.0
    lr: float = 5e-3
    betas: tuple[float, float] = (0.5, 0.999)
    min_lr: float = 1e-4
    warmup_fraction: float = 0.1
    schedule: str = "warmup_cosine"
    seed: int = 111

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"clean": {}, "official": {}}
    CHOICES: ClassVar[dict[str, tuple]] = {"kd_reduction": KD_REDUCTIONS, "image_score": IMAGE_SCORE_MODES,
                                           "schedule": SCHEDULES}

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, preset: str = "clean", **overrides) -> ModelConfig:
        """The preset's values with ``overrides`` on top; unknown names raise ``TypeError``."""
        if preset not in cls.PRESETS:
            raise ValueError(f"preset must be one of {tuple(cls.PRESETS)}, got {preset!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
        return cls(**{**cls.PRESETS[preset], **overrides, "preset": preset})

    @property
    def size(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AnomalyModel(nn.Module):
    """Base of every method: a frozen teacher, a trainable student path, and the shared scoring.

    Subclasses set ``method`` and ``config_class`` and implement :meth:`student_features` and
    :meth:`training_losses` (and :meth:`prepare` when training needs data-dependent state such as memory).
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):  # a subclass that names no method of its own registers nothing
            METHODS[cls.method] = cls

    def __init__(self, config: ModelConfig):
        super().__init__()
        height, width = config.size
        if height % 32 or width % 32:
            raise ValueError(f"image_size must be a multiple of 32 in both dimensions, got {config.image_size}")
        self.config = config
        self.teacher = Teacher(config.backbone, config.weights)
        # Decision thresholds on the image score and the map, chosen on held-out normal images (NaN: not set).
        register_data_buffer(self, "image_threshold", torch.tensor(float("nan")))
        register_data_buffer(self, "pixel_threshold", torch.tensor(float("nan")))

    # -- to implement -------------------------------------------------------------------------------
    def student_features(self, teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's reconstruction of the teacher pyramid at inference."""
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

    @torch.no_grad()
    def set_thresholds(self, image: float, pixel: float) -> None:
        """Store the decision thresholds (saved with the model)."""
        for name, value in (("image", image), ("pixel", pixel)):
            if not math.isfinite(value):
                raise ValueError(f"the {name} threshold must be a finite number, got {value}")
        self.image_threshold.fill_(image)
        self.pixel_threshold.fill_(pixel)

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
        """Anomaly maps and scores for a batch of [0, 1] images at ``image_size`` (no autograd graph)."""
        images = self.input_images(images)
        teacher_feats = self.teacher(images)
        student_feats = self.student_features(teacher_feats)
        maps = ops.anomaly_map(teacher_feats, student_feats, self.config.size, reduce="sum", sigma=self.config.sigma)
        return Prediction(maps, self.image_scores(maps, teacher_feats, student_feats))

    def image_scores(self, maps: torch.Tensor, teacher_feats: list[torch.Tensor],
                     student_feats: list[torch.Tensor]) -> torch.Tensor:
        """Scores ``[B]`` of the blurred maps ``[B, 1, H, W]`` computed from these pyramids: the config's
        ``image_score`` over the map; methods with their own rule override this."""
        return ops.image_score(maps, self.config.image_score, self.config.topk)

    def fit(self, train_data, steps: int = 1000, batch_size: int = 8, **kwargs) -> list[dict[str, float]]:
        """Train on a data set of normal images (items with ``"image"``); see :func:`dmgrd.engine.fit`."""
        from dmgrd.engine import fit

        return fit(self, train_data, steps=steps, batch_size=batch_size, **kwargs)

    def save(self, path: str | Path, **extra) -> None:
        """Write config, weights and buffers (memory banks, thresholds) to ``path`` atomically (write, then
        rename), with the names of the data-built buffers (:mod:`dmgrd.models.state`) that loading checks.

        ``extra`` entries (tensors, numbers, strings, lists and dicts of them) are stored beside the model,
        e.g. the training state for resuming; :func:`read_checkpoint` returns them.
        """
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "data_state": [name for name, _ in data_buffers(self)],
            **extra,
        }
        atomic_save(payload, Path(path))


def atomic_save(payload: dict, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, flush it to disk, then rename: an interrupted save
    (error, kill, power loss) keeps the old file. A killed save leaves a hidden ``.<name>.*.tmp``, which
    nothing reads and which can be deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_payload(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """The raw contents of a dmgrd checkpoint, with clear errors for missing, truncated, foreign or newer files.

    Read with ``torch.load(weights_only=True)``: tensors and plain data only, so a file carrying pickled code is
    refused without running it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"cannot read checkpoint {path}: it is damaged, or holds pickled Python objects other "
                         f"than tensors and plain data, which dmgrd never unpickles (that could run code)") from None
    except Exception as exc:  # truncated or foreign files fail in many ways inside torch.load
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dmgrd checkpoint")
    version = payload.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} has an invalid checkpoint format version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer dmgrd (checkpoint format version {version}); this dmgrd "
                         f"reads format versions up to {CHECKPOINT_VERSION}: upgrade dmgrd to load it")
    return payload


def read_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> tuple[AnomalyModel, dict]:
    """The model saved at ``path`` (in eval mode) and the checkpoint's other entries.

    Read by :func:`read_payload`; errors name the file when its method, configuration or weights do not fit."""
    payload = read_payload(path, map_location)
    method = payload.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"{path} holds an unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[method]
    saved = payload.pop("config")
    config = {**saved, "betas": tuple(saved["betas"]), "weights": None}  # teacher weights are in the state dict
    if isinstance(config["image_size"], list):
        config["image_size"] = tuple(config["image_size"])
    try:
        model = cls(config=cls.config_class(**config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} holds a {method} configuration this dmgrd cannot build: {exc}") from None
    declared = [name for name, _ in data_buffers(model)]
    saved_state = payload.pop("data_state", declared)  # files from before the declaration hold the same buffers
    if sorted(saved_state) != sorted(declared):
        raise ValueError(f"{path}: its data-built buffers {sorted(saved_state)} are not those of this dmgrd's "
                         f"{method} model {sorted(declared)}")
    try:
        model.load_state_dict(_with_thresholds(payload.pop("state_dict"), payload))
    except RuntimeError as exc:
        raise ValueError(f"{path}: the saved weights do not fit a {method} model of the saved configuration: "
                         f"{exc}") from None
    model.config.weights = saved["weights"]
    model.eval()
    if map_location is not None:
        model.to(map_location)
    return model, payload


def _with_thresholds(state: dict, payload: dict) -> dict:
    """``state`` with the threshold buffers; files written before thresholds were model state keep them in a
    ``"thresholds"`` entry (or have none: NaN, not set)."""
    if "image_threshold" in state:
        return state
    stored = payload.get("thresholds") or {}
    thresholds = {f"{kind}_threshold": torch.tensor(float(stored.get(kind, math.nan))) for kind in ("image", "pixel")}
    return {**state, **thresholds}


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> AnomalyModel:
    """Rebuild a model saved with :meth:`AnomalyModel.save`."""
    return read_checkpoint(path, map_location)[0]
