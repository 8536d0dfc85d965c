"""A small built-in defect data set, generated on the fly: a procedural texture or a simple object per data set,
normal variation by shift, pose and colour jitter, and Perlin-shaped defects with exact masks in the test split.

Everything is drawn from ``torch.Generator``s seeded by a stable hash, so item ``i`` depends only on
``(seed, category, split, i)`` and the image size, whoever reads it and in whatever order.
"""

import hashlib
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dmgrd.data.io import Size, check_split, size_pair
from dmgrd.synthesis import perlin_noise, procedural_textures

CATEGORIES = ("texture", "object")
MIN_SIZE = 16  # pixels; smaller objects leave too little room for defects
BRIGHTNESS = (0.93, 1.07)
TINT = (0.97, 1.03)  # per-channel gain of the object
TEXTURE_MARGIN = 0.25  # the texture canvas is this much larger than the image, for random crops
OBJECT_RADIUS = 0.6  # in half-widths of the shorter image side
OBJECT_CORNER = 0.35  # corner radius of the rounded square, in object radii
OBJECT_SHIFT = 0.05
OBJECT_ROTATION = 15.0  # degrees
OBJECT_SCALE = (0.95, 1.05)
DEFECT_INSET = 1.5  # pixels between a defect and the object's edge
DEFECT_TEXTURES = 4
DEFECT_RES_EXPONENTS = (1, 3)  # Perlin lattice of 2..8 cells per axis
STAIN_SHIFT = (0.3, 0.5)  # per channel; pixels move away from 0.5 by shift * (0.4 .. 1)
SCRATCH_SHIFT = 0.5
SCRATCH_PERIOD = (5.0, 9.0)  # pixels at 64 x 64, scaled with the image


def _generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a stable (process-independent) hash of ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _uniform(low: float, high: float, g: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape or (1,), generator=g)


class _Texture:
    """A fixed texture; each image is a random crop of it with a brightness jitter."""

    def __init__(self, size: tuple[int, int], g: torch.Generator):
        self.size = size
        self.margin = max(1, round(TEXTURE_MARGIN * max(size)))
        self.canvas = procedural_textures(1, (size[0] + self.margin, size[1] + self.margin), g)[0]

    def render(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An image [3, H, W] and where defects may go (everywhere)."""
        (height, width), (dy, dx) = self.size, torch.randint(self.margin + 1, (2,), generator=g).tolist()
        image = self.canvas[:, dy:dy + height, dx:dx + width] * _uniform(*BRIGHTNESS, g)
        return image.clamp(0, 1), torch.ones(self.size, dtype=torch.bool)


class _Object:
    """A textured disc or rounded square on a plain background; each image varies its pose and colour."""

    def __init__(self, size: tuple[int, int], g: torch.Generator):
        self.size = size
        self.fill = procedural_textures(1, size, g)
        self.rounded = bool(torch.rand(1, generator=g) < 0.5)
        grey = _uniform(0.08, 0.2, g) if self.fill.mean() > 0.5 else _uniform(0.8, 0.92, g)
        self.background = (grey + _uniform(-0.03, 0.03, g, 3)).view(3, 1, 1)
        height, width = size
        short = min(size)
        ys = (2 * torch.arange(height) + 1 - height) / short
        xs = (2 * torch.arange(width) + 1 - width) / short
        self.points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [H, W, (x, y)]

    def _distance(self, uv: torch.Tensor) -> torch.Tensor:
        """Signed distance to the shape's edge in object radii (negative inside)."""
        if not self.rounded:
            return uv.norm(dim=-1) - 1
        q = uv.abs() - (1 - OBJECT_CORNER)
        return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0) - OBJECT_CORNER

    def render(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An image [3, H, W] and where defects may go (the object's interior)."""
        centre = _uniform(-OBJECT_SHIFT, OBJECT_SHIFT, g, 2)
        angle = math.radians(_uniform(-OBJECT_ROTATION, OBJECT_ROTATION, g).item())
        radius = OBJECT_RADIUS * _uniform(*OBJECT_SCALE, g).item()
        gain = _uniform(*BRIGHTNESS, g) * _uniform(*TINT, g, 3).view(3, 1, 1)
        rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        uv = (self.points - centre) @ rotation / radius  # object frame: rotated by -angle, unit radius
        distance = self._distance(uv) * radius * min(self.size) / 2  # in pixels
        coverage = (0.5 - distance).clamp(0, 1)
        fill = F.grid_sample(self.fill, uv[None], align_corners=False, padding_mode="reflection")[0]
        image = (torch.lerp(self.background, fill, coverage) * gain).clamp(0, 1)
        return image, distance <= -DEFECT_INSET


class Synthetic(Dataset):
    """Built-in deterministic defect data set (items as in ``MVTecAD``, ``path`` a ``synthetic/...`` name).

    ``category``: ``"texture"`` (a procedural texture, randomly cropped, brightness jitter) or ``"object"`` (a
    textured disc or rounded square on a plain background, pose and colour jitter); the product is fixed by
    ``seed``. The train split is all normal; in the test split the odd items carry a defect: a Perlin-shaped
    region covering ``defect_area`` (a fraction of the image, drawn uniformly; inside the object for
    ``"object"``) recoloured with a texture ("stain") or hatched with lines ("scratch"). The mask is exactly
    the set of changed pixels: every channel of each of them moves by at least 0.12.
    """

    def __init__(self, split: str = "train", category: str = "texture", image_size: Size = 64, seed: int = 0,
                 num_train: int = 200, num_test: int = 100, defect_area: tuple[float, float] = (0.01, 0.15)):
        check_split(split)
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        if not 0 < defect_area[0] <= defect_area[1] < 1:
            raise ValueError(f"defect_area must satisfy 0 < low <= high < 1, got {defect_area}")
        self.split, self.category, self.seed = split, category, seed
        self.size = size_pair(image_size)
        if min(self.size) < MIN_SIZE:
            raise ValueError(f"image_size must be at least {MIN_SIZE} pixels per side, got {image_size}")
        self.length = num_train if split == "train" else num_test
        self.defect_area = defect_area
        g = _generator(seed, category, self.size, "product")
        self.product = (_Texture if category == "texture" else _Object)(self.size, g)
        self.defect_textures = procedural_textures(DEFECT_TEXTURES, self.size, g)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.render(index)

    def render(self, index: int, defect: bool = True) -> dict:
        """Item ``index``; with ``defect=False`` its defect-free rendering (same image outside the mask)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index %= self.length
        g = _generator(self.seed, self.category, self.size, self.split, index)
        image, allowed = self.product.render(g)
        label = int(defect and self.split == "test" and index % 2 == 1)
        mask = torch.zeros(1, *self.size)
        if label:
            image, mask[0] = self._add_defect(image, allowed, g)
        path = f"synthetic/{self.category}/seed{self.seed}/{self.split}/{index:05d}"
        return {"image": image, "mask": mask, "label": label, "path": path}

    def _region(self, allowed: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The ``defect_area`` fraction of pixels (at most all ``allowed`` ones) where Perlin noise is highest."""
        height, width = self.size
        exponents = torch.randint(DEFECT_RES_EXPONENTS[0], DEFECT_RES_EXPONENTS[1] + 1, (2,), generator=g)
        noise = perlin_noise(1, self.size, 2**exponents, g)[0]
        area = round(_uniform(*self.defect_area, g).item() * height * width)
        area = max(1, min(area, int(allowed.sum())))
        top = noise.masked_fill(~allowed, -math.inf).flatten().topk(area).indices
        return torch.zeros(height * width, dtype=torch.bool).index_fill_(0, top, True).view(height, width)

    def _stripes(self, g: torch.Generator) -> torch.Tensor:
        """Parallel lines a third of their period wide, at a random angle and phase."""
        height, width = self.size
        period = _uniform(*SCRATCH_PERIOD, g).item() * max(1.0, min(self.size) / 64)
        angle, phase = _uniform(0, math.pi, g).item(), _uniform(0, 1, g).item()
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        position = (xs * math.cos(angle) + ys * math.sin(angle)) / period + phase
        return position.frac() < 1 / 3

    def _add_defect(self, image: torch.Tensor, allowed: torch.Tensor,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The image with a stain or scratch defect, and its mask [H, W]."""
        away = torch.where(image < 0.5, 1.0, -1.0)  # towards the far end of [0, 1], so no clipping is needed
        if bool(torch.rand(1, generator=g) < 0.5):
            texture = self.defect_textures[int(torch.randint(DEFECT_TEXTURES, (1,), generator=g))]
            change = _uniform(*STAIN_SHIFT, g, 3).view(3, 1, 1) * (0.4 + 0.6 * texture)
        else:
            allowed = allowed & self._stripes(g)
            change = torch.full_like(image, SCRATCH_SHIFT)
        region = self._region(allowed, g)
        return torch.where(region, image + away * change, image), region.float()
