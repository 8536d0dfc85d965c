"""DRD's self cut-paste pseudo-anomalies and their soft masks (SPEC §7.1, §7.2)."""

from collections.abc import Sequence

import torch

from dmgrd.ops.anomaly_map import cosine_distance_reference
from dmgrd.synthesis.draws import randint_below

CUTPASTE_REFERENCE_SIDE = 256
# (smallest side, largest side, probability) at a 256-pixel image: large, medium and small patches
CUTPASTE_SIZES = ((150, 200, 0.2), (64, 100, 0.3), (10, 32, 0.5))


def cutpaste_sides(count: int, side: int, generator: torch.Generator,
                   sizes: Sequence[tuple[int, int, float]] = CUTPASTE_SIZES) -> torch.Tensor:
    """``count`` patch side lengths (CPU int64) from the mixture ``sizes`` of ``U{low..high}`` with probabilities.

    ``sizes`` are for a 256-pixel image; the draws are rescaled to ``side`` pixels and kept within
    ``1 .. side - 3`` so that a patch always fits the paste range.
    """
    if side < 4:
        raise ValueError(f"images must be at least 4 pixels on each side for a cut-paste, got {side}")
    low, high, prob = (torch.tensor(column, dtype=torch.float64) for column in zip(*sizes, strict=True))
    cumulative = (prob / prob.sum()).cumsum(0)
    uniform = torch.rand(count, generator=generator, device=generator.device).cpu()
    component = (uniform[:, None] >= cumulative[:-1]).sum(1)
    sides = low[component] + randint_below((high - low + 1).long()[component], generator)
    return (sides * side / CUTPASTE_REFERENCE_SIDE).round().long().clamp(1, side - 3)


def _window_indices(length: int, sides: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: ``[B, length]`` bool of the pasted window and the index each pixel copies from."""
    positions = torch.arange(length, device=device)
    sides, source, target = (x.to(device)[:, None] for x in (sides, source, target))
    inside = (positions >= target) & (positions < target + sides)
    return inside, (positions - target + source).clamp(0, length - 1)


def self_cutpaste(images: torch.Tensor, generator: torch.Generator, per_sample: bool = False,
                  strength: float = 0.2, sizes: Sequence[tuple[int, int, float]] = CUTPASTE_SIZES
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """DRD's pseudo-anomalies: a square of each ``[B, 3, H, W]`` image (in [0, 1]) pasted elsewhere on itself.

    The side ``t`` comes from the mixture ``sizes`` (see :func:`cutpaste_sides`), once for the whole batch (the
    official code) or, with ``per_sample``, once per image. The patch is cut at a uniform position
    (top-left in ``[0, H - t)``) and pasted at one in ``[1, H - t - 1)`` (same for x) as
    ``patch + strength * destination``, without clipping: values can exceed 1, as in the official code, and
    the teacher normalises them like any image. Returns the images and the binary paste masks
    ``[B, 1, H, W]`` (images' dtype). Draws happen on the generator's device, pixels on the images' device.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    sides = cutpaste_sides(batch if per_sample else 1, min(height, width), generator, sizes).expand(batch)
    (in_y, rows), (in_x, cols) = (
        _window_indices(length, sides, randint_below(length - sides, generator),
                        1 + randint_below(length - sides - 2, generator), images.device)
        for length in (height, width)
    )
    patch = images.gather(2, rows[:, None, :, None].expand(batch, channels, height, width))
    patch = patch.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return torch.where(mask, patch + strength * images, images), mask.to(images.dtype)


def color_distance(augmented: torch.Tensor, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                   ) -> torch.Tensor:
    """DRD's soft mask ``1 - cos_RGB`` per pixel of the normalised images, ``[B, 1, H, W]`` in [0, 2] (float32).

    ``mean``/``std`` (``[1, 3, 1, 1]``) are the teacher's input normalisation: the official code compares the
    ImageNet-normalised images. It is 0 where the images agree and small where a pasted patch has similar colours.
    """
    return cosine_distance_reference((augmented - mean) / std, (images - mean) / std).unsqueeze(1).float()
