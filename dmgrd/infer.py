"""Standalone inference: ``Inferencer(path)`` for a checkpoint (``.pt``), an ONNX file (``.onnx``) or an OpenVINO
IR (``.xml``), with the same preprocessing, scores, normalised scores, labels and masks for each.

The ONNX path needs only numpy, pillow and onnxruntime (``pip install 'dmgrd[infer]'``): this module imports no
torch, and ``import dmgrd.infer`` imports none either. A checkpoint needs torch; OpenVINO needs
``pip install 'dmgrd[openvino]'``. What the model needs besides its graph (input size, preprocessing,
thresholds, score range) comes from the file (:mod:`dmgrd.metadata`), never from the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from dmgrd._optional import optional_module
from dmgrd.imaging import model_input, open_image, pixel_array
from dmgrd.metadata import METADATA_KEY, InferenceMetadata
from dmgrd.sizes import Size
from dmgrd.tiling import predict_tiled

__all__ = ["InferenceResult", "Inferencer"]

ImageInput = str | Path | Image.Image | np.ndarray
FORMATS = {".pt": "checkpoint", ".pth": "checkpoint", ".ckpt": "checkpoint", ".onnx": "onnx", ".xml": "openvino"}


@dataclass(frozen=True)
class InferenceResult:
    """One image's prediction. ``anomaly_map`` [H, W] float32 at the model's input size (tiled: the image's);
    ``normalized_score`` in [0, 1], the image threshold at 0.5; ``label`` True when anomalous (score above the
    image threshold); ``mask`` [H, W] bool, map above the pixel threshold. Without stored thresholds (or score
    range) those are None."""

    score: float
    anomaly_map: np.ndarray
    normalized_score: float | None
    label: bool | None
    mask: np.ndarray | None


class _Backend(Protocol):
    metadata: InferenceMetadata

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, H, W] in [0, 1] -> maps [B, 1, H, W], scores [B] (numpy float32)."""
        ...


class _Checkpoint:
    def __init__(self, path: Path, device: str):
        torch = optional_module("torch", "a checkpoint needs dmgrd with torch: pip install dmgrd (or export it to "
                                         "ONNX where torch is installed)")
        from dmgrd.export import inference_metadata
        from dmgrd.models import load

        self.torch = torch
        self.model = load(path, map_location=device)
        self.metadata = inference_metadata(self.model)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prediction = self.model(self.torch.from_numpy(images).to(self.model.device))
        return prediction.anomaly_map.float().cpu().numpy(), prediction.score.float().cpu().numpy()


def _metadata(text: str | None, path: Path) -> InferenceMetadata:
    if text is None:
        raise ValueError(f"{path} holds no dmgrd metadata ({METADATA_KEY!r}): it was not written by `dmgrd export` "
                         f"(or by an older dmgrd): export its checkpoint again")
    return InferenceMetadata.from_json(text, str(path))


class _Onnx:
    def __init__(self, path: Path, device: str):
        onnxruntime = optional_module("onnxruntime", "pip install 'dmgrd[infer]'")
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.metadata = _metadata(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(["anomaly_map", "score"], {"images": images})
        return maps, scores


class _OpenVino:
    def __init__(self, path: Path, device: str):
        ov = optional_module("openvino", "pip install 'dmgrd[openvino]'")
        model = ov.Core().read_model(str(path))
        text = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
        self.metadata = _metadata(text, path)
        # float32 throughout: OpenVINO's CPU plugin would otherwise compute in bf16 where the CPU has it.
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.compiled(images)
        return out[self.compiled.output("anomaly_map")], out[self.compiled.output("score")]


BACKENDS: dict[str, type] = {"checkpoint": _Checkpoint, "onnx": _Onnx, "openvino": _OpenVino}


def pixels(image: ImageInput) -> np.ndarray:
    """The pixels of a file path, PIL image or numpy image (H x W or H x W x C, channels last; integers scaled by
    their bit depth, floats in [0, 1]), checked; errors say what is wrong."""
    if isinstance(image, str | Path):
        return pixel_array(open_image(image))
    if isinstance(image, Image.Image):
        return pixel_array(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image must be a file path, a PIL image or a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"a numpy image must be H x W or H x W x C (channels last, C in 1-4), got shape "
                         f"{image.shape}")
    if image.dtype.kind not in "uif":
        raise ValueError(f"a numpy image must hold integers or floats, got {image.dtype}")
    if image.size == 0:
        raise ValueError(f"the image is empty (shape {image.shape})")
    if image.dtype.kind == "f":
        low, high = float(image.min()), float(image.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("the image contains NaN or infinite values")
        if low < 0 or high > 1:
            raise ValueError(f"float image values span [{low:.4g}, {high:.4g}] but must lie in [0, 1]: pass 8-bit "
                             f"images as uint8 (or divide them by 255)")
    return image


class Inferencer:
    """Predictions of an exported or saved model from image files, PIL images or numpy arrays.

    ``Inferencer("model.onnx").predict("image.png")`` -> :class:`InferenceResult`. The format follows the suffix:
    ``.pt`` / ``.pth`` / ``.ckpt`` a dmgrd checkpoint (needs torch; ``device`` applies to it), ``.onnx`` (needs
    onnxruntime), ``.xml`` an OpenVINO IR (needs openvino). Every format gives the same decisions.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        kind = FORMATS.get(self.path.suffix.lower())
        if kind is None:
            raise ValueError(f"{self.path}: unknown model format {self.path.suffix!r}; expected a checkpoint "
                             f"(.pt, .pth, .ckpt), ONNX (.onnx) or OpenVINO IR (.xml)")
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        self.format = kind
        self.backend: _Backend = BACKENDS[kind](self.path, device)
        self.metadata = self.backend.metadata

    @property
    def input_size(self) -> tuple[int, int]:
        return self.metadata.input_size

    def use_category(self, category: str) -> None:
        """Decide with ``category``'s own thresholds, those of a checkpoint trained on several categories at once
        (exported files carry only the model's overall thresholds)."""
        model = getattr(self.backend, "model", None)
        if model is None:
            raise ValueError(f"{self.path}: per-category thresholds are kept in checkpoints (.pt), not in "
                             f"{self.format} files")
        if category not in model.category_thresholds:
            raise ValueError(f"{self.path} has no thresholds of category {category!r} (it has: "
                             f"{', '.join(model.category_thresholds) or 'none; it was trained on one category'})")
        own = model.category_thresholds[category]
        self.metadata = replace(self.metadata, image_threshold=own["image"], pixel_threshold=own["pixel"])

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """The model's float32 [3, H, W] input for ``image`` (RGB, [0, 1], resized to :attr:`input_size`)."""
        return model_input(pixels(image), self.input_size)

    def predict(self, image: ImageInput) -> InferenceResult:
        """The prediction for one image, resized to the model's input size."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[InferenceResult]:
        """:meth:`predict` of every image, ``batch_size`` at a time."""
        results = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(image) for image in images[start:start + batch_size]])
            maps, scores = self.backend.run(batch)
            results += [self._result(float(s), m[0]) for m, s in zip(maps, scores, strict=True)]
        return results

    def predict_tiled(self, image: ImageInput, tile: Size | None = None, stride: Size | None = None,
                      batch_size: int = 8) -> InferenceResult:
        """The prediction for a large image at its own resolution: overlapping tiles (default the model's input
        size, stride half of it), maps blended into one [H, W] map, the score the largest tile score
        (:mod:`dmgrd.tiling`); memory bounded whatever the image size."""
        amap, score = predict_tiled(self.backend.run, pixels(image), self.input_size, tile, stride, batch_size)
        return self._result(score, amap)

    def _result(self, score: float, amap: np.ndarray) -> InferenceResult:
        meta = self.metadata
        return InferenceResult(
            score=score,
            anomaly_map=amap,
            normalized_score=meta.normalized_score(score),
            label=None if meta.image_threshold is None else score > meta.image_threshold,
            mask=None if meta.pixel_threshold is None else amap > meta.pixel_threshold,
        )
