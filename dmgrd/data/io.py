"""Reading images, masks and sample lists into float tensors and item dicts, with errors that name the file."""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from dmgrd.imaging import open_image, pixel_array, rgb_float

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_RULES = (">0.5", ">0", "==1")
SPLITS = ("train", "test")

Size = int | tuple[int, int]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def size_pair(size: Size) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_rule(rule: str) -> None:
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")


def _image_tensor(image: Image.Image, size: Size | None) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb_float(pixel_array(image)))).permute(2, 0, 1)
    if size is not None:
        x = _resize(x, size_pair(size)).clamp_(0, 1)
    return x.contiguous()


def _mask_values(image: Image.Image) -> np.ndarray:
    """H x W float mask: grey levels (colour and palette masks through ``convert("L")``) divided by 1 when the
    largest is 1 ({0, 1} masks), by 255 when it is at most 255 (8-bit values, also in 16-bit files), else 65535."""
    array = np.asarray(image if image.mode.startswith("I") or image.mode in ("L", "1") else image.convert("L"))
    top = int(array.max())
    return array.astype(np.float32) / (1.0 if top <= 1 else 255.0 if top <= 255 else 65535.0)


def _mask_tensor(image: Image.Image, size: Size | None, rule: str, nonzero: bool) -> torch.Tensor:
    array = _mask_values(image)
    if nonzero:
        array = (array > 0).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(array))[None]
    if size is not None:
        x = _resize(x, size_pair(size))
    if rule == ">0.5":
        return (x > 0.5).float()
    if rule == ">0":
        return (x > 0).float()
    return (x >= 1.0).float()


def read_image(path: str | Path, size: Size | None = None) -> torch.Tensor:
    """RGB float32 tensor [3, H, W] in [0, 1], bilinearly resized to ``size`` if given (antialiased when shrinking).

    Read as image viewers show it: turned by its EXIF orientation; grey and 16-bit grey repeated to three
    channels (16-bit divided by 65535); palette, CMYK and other modes converted by ``convert("RGB")``, which
    drops alpha.
    """
    return _image_tensor(open_image(Path(path)), size)


def read_mask(path: str | Path, size: Size | None = None, rule: str = ">0.5", nonzero: bool = False) -> torch.Tensor:
    """Binary float32 mask [1, H, W] in {0, 1}: scaled to [0, 1], bilinear resize, then binarised by ``rule``
    (SPEC §1.1).

    Colour and palette masks are converted to grey first. Masks stored as {0, 1} (instead of {0, 255}) are
    recognised, and so are 8-bit values in 16-bit files. With ``nonzero`` every non-zero pixel counts as
    foreground before resizing (label masks such as VisA's raw ones).
    """
    _check_rule(rule)
    return _mask_tensor(open_image(Path(path)), size, rule, nonzero)


def read_pair(
    image_path: str | Path, mask_path: str | Path, size: Size | None = None, rule: str = ">0.5", nonzero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``read_image`` and ``read_mask`` of an image and its mask, which must have the same size before resizing."""
    _check_rule(rule)
    image, mask = open_image(Path(image_path)), open_image(Path(mask_path))
    if image.size != mask.size:
        raise ValueError(
            f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} (WxH) but its image {image_path} is "
            f"{image.size[0]}x{image.size[1]}"
        )
    return _image_tensor(image, size), _mask_tensor(mask, size, rule, nonzero)


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder; otherwise an error saying that ``what`` is missing or not a folder."""
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} is not a folder: {path}")
    raise FileNotFoundError(f"{what} not found: {path}")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and, with ``recursive``, its subfolders), sorted by path: files with a suffix
    of :data:`IMAGE_SUFFIXES` (any case) whose name does not start with ``.`` (hidden files such as macOS
    ``._name.png`` are skipped)."""
    try:
        candidates = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in candidates
                      if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    except OSError as exc:
        raise OSError(f"cannot list folder {folder}: {exc}") from None


def images_in(folder: Path, what: str, recursive: bool = False) -> list[Path]:
    """:func:`list_images` of a folder that must exist and hold images; the errors name ``what`` and the folder."""
    images = list_images(require_dir(folder, what), recursive)
    if not images:
        raise FileNotFoundError(f"no images in {what} {folder}")
    return images


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def category_dir(root: Path, category: str, dataset: str) -> Path:
    """``root / category``; errors name a missing root, or list the categories found when the category is missing."""
    require_dir(root, f"{dataset} root folder")
    folder = root / category
    if not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"category {category!r} not found in {root} (found: {', '.join(known)})")
    return folder


class MaskFinder:
    """Masks in a folder matched to images by stem: ``<stem>.<ext>`` or ``<stem>_mask.<ext>``, any image suffix."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_stem: dict[str, list[Path]] = {}
        for path in list_images(folder) if folder.is_dir() else []:
            self._by_stem.setdefault(path.stem, []).append(path)

    def __call__(self, image: Path) -> Path:
        """The one mask of ``image``; raises naming the image if there is none or more than one."""
        found = self._by_stem.get(image.stem, []) + self._by_stem.get(f"{image.stem}_mask", [])
        if not found:
            raise FileNotFoundError(
                f"ground-truth mask missing for {image}: expected {self.folder / image.stem}_mask.png "
                f"or {image.stem}.png (any image suffix)"
            )
        if len(found) > 1:
            raise ValueError(f"several masks for {image}: {', '.join(str(p) for p in found)}")
        return found[0]


class Sample(NamedTuple):
    image: Path
    mask: Path | None  # None: all-zero mask
    label: int


class SampleDataset(Dataset):
    """Items read from a list of samples: dicts with ``image`` float32 [3, H, W] in [0, 1], ``mask`` float32
    [1, H, W] in {0, 1}, ``label`` 0 (normal) or 1, ``path``; ``(H, W)`` is ``image_size`` (an int means square).
    """

    def __init__(self, samples: Sequence[Sample], image_size: Size = 256, mask_rule: str = ">0.5",
                 nonzero_masks: bool = False):
        _check_rule(mask_rule)
        self.samples = list(samples)
        self.image_size = image_size
        self.mask_rule = mask_rule
        self.nonzero_masks = nonzero_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path, label = self.samples[index]
        if mask_path is None:
            image = read_image(image_path, self.image_size)
            mask = torch.zeros(1, *image.shape[1:])
        else:
            image, mask = read_pair(image_path, mask_path, self.image_size, self.mask_rule, self.nonzero_masks)
        return {"image": image, "mask": mask, "label": label, "path": str(image_path)}
