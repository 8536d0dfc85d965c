"""Method settings: one dataclass per method with named presets (``official``, ``clean``), saved in checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from dmgrd.layout import size_pair
from dmgrd.losses import KD_REDUCTIONS
from dmgrd.ops.anomaly_map import REDUCTIONS as MAP_REDUCTIONS
from dmgrd.ops.image_score import MODES as IMAGE_SCORE_MODES

# "warmup_cosine": linear warm-up to lr, cosine down to min_lr (DM-GRD); "constant": lr throughout (RD4AD,
# RD++ and DRD code have no scheduler).
SCHEDULES = ("warmup_cosine", "constant")


@dataclass
class ModelConfig:
    """Settings every method shares. ``preset`` names the defaults the method's presets filled in.

    ``map_reduce`` combines the levels' distance maps (``"sum"``, RD4AD's, ``"mean"`` or ``"mul"``); ``image_score``
    reduces the map to the image score (``"max"`` or the mean of the ``topk`` largest pixels).
    """

    backbone: str = "wide_resnet50_2"
    weights: str | None = "imagenet"
    preset: str = "clean"
    image_size: int | tuple[int, int] = 256
    kd_reduction: str = "flatten"
    map_reduce: str = "sum"
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
    CHOICES: ClassVar[dict[str, tuple]] = {"kd_reduction": KD_REDUCTIONS, "map_reduce": MAP_REDUCTIONS,
                                           "image_score": IMAGE_SCORE_MODES, "schedule": SCHEDULES}

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
        """``image_size`` as ``(H, W)``."""
        return size_pair(self.image_size, "image_size")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (what checkpoints store)."""
        return dataclasses.asdict(self)
