"""Thin pseudo-anomalies: random-walk polylines a few pixels wide (scratches, cracks), batched on the images' device."""

import math

import torch

from dmgrd.layout import Size, size_pair
from dmgrd.synthesis.draws import uniform


def polyline_mask(
    batch: int,
    size: Size,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    segments: tuple[int, int] = (2, 6),
    step: tuple[float, float] = (0.04, 0.16),
    width: tuple[float, float] = (1.0, 4.0),
    turn: float = 0.4,
) -> torch.Tensor:
    """Binary masks ``[B, 1, H, W]`` (float 0/1) of one thin random-walk polyline per sample.

    Per sample: ``U{segments}`` segments from a uniform start point, the first heading uniform, each next heading
    turned by ``N(0, turn)`` radians, each segment ``U(step)`` times the shorter image side long; the line is
    ``U(width)`` pixels wide at a 256-pixel shorter side (scaled with it, at least one pixel), and may leave the
    image (a one-pixel line leaving it between pixel centres can leave the mask empty). Random draws
    happen on the generator's device, the rasterisation (:func:`rasterize_polylines`) on ``device`` (default:
    the generator's).
    """
    height, width_px = size_pair(size)
    device = generator.device if device is None else torch.device(device)
    short = min(height, width_px)
    most = segments[1]
    counts = torch.randint(segments[0], most + 1, (batch,), generator=generator, device=generator.device)
    start = torch.stack((uniform((batch,), 0, height, generator), uniform((batch,), 0, width_px, generator)), -1)
    headings = uniform((batch, 1), 0.0, 2 * math.pi, generator)
    turns = turn * torch.randn(batch, most - 1, generator=generator, device=generator.device)
    headings = torch.cat((headings, headings + turns.cumsum(1)), 1)
    lengths = uniform((batch, most), step[0] * short, step[1] * short, generator)
    radius = (uniform((batch,), width[0] / 2, width[1] / 2, generator) * short / 256).clamp_min(0.5)
    moves = lengths[..., None] * torch.stack((headings.sin(), headings.cos()), -1)  # [B, K, (y, x)]
    points = torch.cat((start[:, None], start[:, None] + moves.cumsum(1)), 1)
    active = torch.arange(most, device=generator.device) < counts[:, None]
    return rasterize_polylines(points.to(device), active.to(device), radius.to(device), (height, width_px))


def rasterize_polylines(points: torch.Tensor, active: torch.Tensor, radius: torch.Tensor, size: Size) -> torch.Tensor:
    """Masks ``[B, 1, H, W]``: the pixels whose centre lies within ``radius`` ``[B]`` of a polyline.

    ``points`` ``[B, K + 1, 2]`` are the vertices as (row, column) in pixel units (pixel ``(i, j)`` covers
    ``[i, i + 1) x [j, j + 1)``); ``active`` ``[B, K]`` says which of the K segments each polyline has.
    """
    height, width = size_pair(size)
    batch, vertices, _ = points.shape
    ys = torch.arange(height, device=points.device, dtype=points.dtype)[None, :, None] + 0.5
    xs = torch.arange(width, device=points.device, dtype=points.dtype)[None, None, :] + 0.5
    nearest = torch.full((batch, height, width), math.inf, device=points.device, dtype=points.dtype)
    for k in range(vertices - 1):
        ay, ax, by, bx = (points[:, k + i // 2, i % 2].view(batch, 1, 1) for i in range(4))
        dy, dx = by - ay, bx - ax
        along = (((ys - ay) * dy + (xs - ax) * dx) / (dy * dy + dx * dx).clamp_min(1e-12)).clamp(0, 1)
        distance = (ys - ay - along * dy).square() + (xs - ax - along * dx).square()
        nearest = torch.where(active[:, k].view(batch, 1, 1), torch.minimum(nearest, distance), nearest)
    return (nearest <= radius.view(batch, 1, 1).square())[:, None].float()
