"""Reading images and masks into float tensors, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_RULES = (">0.5", ">0", "==1")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return image


def _to_float(image: Image.Image) -> np.ndarray:
    """H x W x C float array in [0, 1] for 8/16-bit, grayscale, RGB(A) or palette images."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype in (np.uint16, np.int32) or image.mode.startswith("I"):
        return array.astype(np.float32) / 65535.0
    if array.dtype == bool:
        return array.astype(np.float32)
    return array.astype(np.float32)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def read_image(path: str | Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB float32 tensor [3, H, W] in [0, 1], bilinearly resized to ``size`` if given."""
    path = Path(path)
    image = _open(path)
    if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
        image = image.convert("RGB")
    array = _to_float(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    x = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)
    if size is not None:
        x = _resize(x, _pair(size)).clamp_(0, 1)
    return x.contiguous()


def read_mask(path: str | Path, size: int | tuple[int, int] | None = None, rule: str = ">0.5") -> torch.Tensor:
    """Binary float32 mask [1, H, W] in {0, 1}: bilinear resize, then binarised by ``rule`` (SPEC §1.1).

    Masks stored as {0, 1} (instead of {0, 255}) are recognised and scaled up first.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")
    path = Path(path)
    image = _open(path)
    array = _to_float(image.convert("L") if image.mode not in ("L", "I", "I;16", "1") else image)
    if array.ndim == 3:
        array = array[..., 0]
    if 0 < array.max() <= 1.0 / 255.0 + 1e-6:
        array = array * 255.0
    x = torch.from_numpy(np.ascontiguousarray(array))[None]
    if size is not None:
        x = _resize(x, _pair(size))
    if rule == ">0.5":
        return (x > 0.5).float()
    if rule == ">0":
        return (x > 0).float()
    return (x >= 1.0).float()


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
