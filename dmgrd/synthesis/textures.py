"""Procedural textures (fractal Perlin noise between two colours): DM-GRD's texture source without a texture folder,
and the built-in Synthetic data's backgrounds."""

import noise
import numpy as np
import torch

from dmgrd.layout import Size, size_pair
from dmgrd.synthesis.draws import uniform

TEXTURE_OCTAVES = 4
TEXTURE_FREQUENCY_RANGE = (2.0, 16.0)  # base Perlin cycles across the texture
TEXTURE_OFFSET_RANGE = 256.0
TEXTURE_CONTRAST_RANGE = (0.25, 0.75)  # cyclic shift from the first colour to the second, per channel


_pnoise2 = np.frompyfunc(noise.pnoise2, 3, 1)


def procedural_textures(count: int, size: Size, generator: torch.Generator) -> torch.Tensor:
    """``count`` RGB textures ``[count, 3, H, W]`` in [0, 1] from ``noise.pnoise2`` (a DTD stand-in).

    Each texture has a random base frequency and offset; its noise, stretched to [0, 1], interpolates
    between two random colours that differ by at least 0.25 in every channel.
    """
    height, width = size_pair(size)
    frequency = uniform((count, 2), *TEXTURE_FREQUENCY_RANGE, generator).cpu().numpy()
    offset = uniform((count, 2), 0.0, TEXTURE_OFFSET_RANGE, generator).cpu().numpy()
    first = torch.rand(count, 3, 1, 1, generator=generator, device=generator.device).cpu()
    second = (first + uniform((count, 3, 1, 1), *TEXTURE_CONTRAST_RANGE, generator).cpu()) % 1
    ys = np.arange(height) / height * frequency[:, 0, None] + offset[:, 0, None]
    xs = np.arange(width) / width * frequency[:, 1, None] + offset[:, 1, None]
    values = torch.from_numpy(_pnoise2(xs[:, None, :], ys[:, :, None], TEXTURE_OCTAVES).astype(np.float32))
    low = values.amin(dim=(1, 2), keepdim=True)
    high = values.amax(dim=(1, 2), keepdim=True)
    t = ((values - low) / (high - low).clamp_min(1e-12))[:, None]
    return torch.lerp(first, second, t)
