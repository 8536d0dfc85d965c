"""Images as numpy arrays, without torch: decoding files, pixel values in [0, 1], RGB, resizing. The data sets
(:mod:`dmgrd.data.io`) and the standalone inferencer (:mod:`dmgrd.infer`) read images through these functions."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def open_image(path: str | Path) -> Image.Image:
    """The decoded image, turned as its EXIF orientation says (as image viewers show it); errors name the file."""
    try:
        image = Image.open(path)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"cannot read image {path}: {exc} Raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) "
                         "to read images this large") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return image


def pixel_array(image: Image.Image) -> np.ndarray:
    """The pixels of ``image`` as stored (H x W grey or H x W x C, 8/16-bit or float): grey, RGB(A) and 16/32-bit
    or float grey stay as they are, palette, CMYK and other modes go through ``convert("RGB")``."""
    if image.mode not in ("RGB", "RGBA", "L", "LA") and not image.mode.startswith(("I", "F")):
        image = image.convert("RGB")
    return np.asarray(image)


def to_float(array: np.ndarray) -> np.ndarray:
    """``array`` as float32 in [0, 1]: 8-bit values divided by 255, wider integers by 65535, floats as they are."""
    result = array.astype(np.float32)
    if array.dtype.kind in "ui":
        result /= 255.0 if array.dtype.itemsize == 1 else 65535.0  # in place: saves a copy of large images
    return result


def rgb_float(array: np.ndarray) -> np.ndarray:
    """H x W x 3 float32 in [0, 1] from H x W grey (repeated), H x W x 1/2 (grey, grey + alpha) or H x W x 3/4
    pixels (alpha dropped), converted by :func:`to_float`."""
    if array.ndim == 3 and array.shape[2] in (1, 2):
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(to_float(array)[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"an image must be H x W (grey) or H x W x C with C in 1-4 channels, got shape "
                         f"{array.shape}")
    return to_float(array[..., :3])


def resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x C float32 bilinearly resized to ``size`` (H, W), antialiased when shrinking (PIL's filter; it
    equals torch's ``interpolate(mode="bilinear", antialias=True)`` to about 2e-6)."""
    if array.shape[:2] == tuple(size):
        return array
    height, width = size
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c]))
                           .resize((width, height), Image.Resampling.BILINEAR)) for c in range(array.shape[2])]
    return np.stack(channels, axis=2)


def model_input(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The preprocessing of :data:`dmgrd.metadata.PREPROCESSING`: pixels (as :func:`pixel_array` gives them, or
    a numpy image) to the float32 [3, H, W] input of a model of input ``size``: RGB in [0, 1], resized, clipped."""
    return np.ascontiguousarray(np.clip(resize(rgb_float(array), size), 0, 1).transpose(2, 0, 1))
