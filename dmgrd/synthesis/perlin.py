"""Perlin noise and DM-GRD's thresholded, rotated Perlin masks (SPEC §4.2), batched on the images' device."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dmgrd.layout import Size, size_pair
from dmgrd.synthesis.draws import uniform


def _resolution(res: torch.Tensor | Sequence[int] | int, batch: int) -> torch.Tensor:
    """Lattice resolution as a CPU ``[B, 2]`` int64 tensor of (rows, columns) from an int, a pair or ``[B, 2]``."""
    res = torch.as_tensor(res, dtype=torch.int64, device="cpu")
    res = res.expand(batch, 2) if res.dim() < 2 and res.numel() in (1, 2) else res
    if res.shape != (batch, 2) or bool((res < 1).any()):
        raise ValueError(f"res must be positive and broadcast to [{batch}, 2], got {tuple(res.shape)}")
    return res


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def _lattice_coordinates(length: int, res: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer cell index and fractional position ``[B, length]`` of each pixel on a lattice of ``res`` cells."""
    pixels = torch.arange(length, device=device, dtype=torch.float32)
    position = pixels / length * res.to(device, torch.float32)[:, None]
    cell = position.floor()
    return cell.long(), position - cell


def perlin_noise(
    batch: int,
    size: Size,
    res: torch.Tensor | Sequence[int] | int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """2-D Perlin gradient noise ``[B, H, W]`` in [-1, 1] (DRAEM ``rand_perlin_2d``).

    ``res`` is the number of lattice cells (rows, columns), shared or per sample (``[B, 2]``). Pixel ``i`` sits at
    lattice coordinate ``i * res / size``, which is DRAEM's grid when ``size`` is a multiple of ``res`` and stays
    valid when it is not. Gradient angles are drawn on the generator's device; the interpolation runs on ``device``
    (default: the generator's).
    """
    height, width = size_pair(size)
    device = generator.device if device is None else torch.device(device)
    res = _resolution(res, batch)
    rows, cols = (int(r) + 1 for r in res.max(dim=0).values)
    angles = uniform((batch, rows, cols), 0.0, 2 * math.pi, generator).to(device)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [B, rows, cols, (y, x)]
    cell_y, frac_y = _lattice_coordinates(height, res[:, 0], device)
    cell_x, frac_x = _lattice_coordinates(width, res[:, 1], device)
    samples = torch.arange(batch, device=device)[:, None, None]

    def corner(dy: int, dx: int) -> torch.Tensor:
        grad = gradients[samples, (cell_y + dy)[:, :, None], (cell_x + dx)[:, None, :]]
        return grad[..., 0] * (frac_y - dy)[:, :, None] + grad[..., 1] * (frac_x - dx)[:, None, :]

    fade_y, fade_x = _fade(frac_y)[:, :, None], _fade(frac_x)[:, None, :]
    top = torch.lerp(corner(0, 0), corner(0, 1), fade_x)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fade_x)
    return math.sqrt(2) * torch.lerp(top, bottom, fade_y)


def _rotation_theta(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``affine_grid`` matrices ``[B, 2, 3]`` rotating about the centre in pixel space (no aspect distortion)."""
    radians = torch.deg2rad(degrees)
    cos, sin = radians.cos(), radians.sin()
    zero = torch.zeros_like(cos)
    return torch.stack(
        (torch.stack((cos, -sin * height / width, zero), -1), torch.stack((sin * width / height, cos, zero), -1)),
        dim=1,
    )


def rotate_maps(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, C, H, W]`` maps by per-sample angles (bilinear, zeros outside), like imgaug ``Affine(rotate=)``."""
    batch, channels, height, width = maps.shape
    theta = _rotation_theta(degrees.to(maps.device, maps.dtype), height, width)
    grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perlin_mask(
    batch: int,
    size: Size,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    min_scale: int = 0,
    max_scale: int = 5,
    threshold: float = 0.5,
    rotate: bool = True,
) -> torch.Tensor:
    """Binary Perlin masks ``[B, 1, H, W]`` (float 0/1) as in DRAEM / DM-GRD.

    Per sample: lattice ``2**ty x 2**tx`` with ``tx, ty ~ U{min_scale..max_scale}``, a rotation by
    ``U(-90, 90)`` degrees (if ``rotate``), then ``noise > threshold``. A mask may come out empty (as in DRAEM).
    Computed on ``device`` (default: the generator's).
    """
    exponents = torch.randint(min_scale, max_scale + 1, (batch, 2), generator=generator, device=generator.device)
    maps = perlin_noise(batch, size, 2 ** exponents.cpu(), generator, device)[:, None]
    if rotate:
        maps = rotate_maps(maps, uniform((batch,), -90.0, 90.0, generator))
    return (maps > threshold).float()
