"""DM-GRD's pseudo-anomalies: a Perlin mask, Fourier mixing with a random texture, then a blend (SPEC §4.2); or,
for thin defects, a polyline of a random grey level."""

import torch
import torch.nn.functional as F

from dmgrd.synthesis.draws import uniform
from dmgrd.synthesis.fourier import BLEND_MODES, blend, fourier_mix
from dmgrd.synthesis.lines import polyline_mask
from dmgrd.synthesis.perlin import perlin_mask

# "blobs": Perlin-mask regions filled with the Fourier mix of the image and a texture (the paper's); "lines":
# thin random-walk polylines (scratches, cracks) of a random grey level.
SHAPES = ("blobs", "lines")


class AnomalySynthesizer:
    """Batched DM-GRD pseudo-anomalies: Perlin mask, FDA mix with a random texture, then a blend (SPEC §4.2).

    ``shapes`` (a subset of :data:`SHAPES`, each sample draws one uniformly): ``"blobs"`` as above; ``"lines"``
    a thin polyline (:func:`~dmgrd.synthesis.lines.polyline_mask`) blended towards a uniform grey level
    ``g ~ U(0, 1)`` in place of the Fourier mix, so it shows as a darker or brighter scratch.
    """

    def __init__(
        self,
        textures: torch.Tensor,
        blend: str = "draem",
        beta_range: tuple[float, float] = (0.0, 0.8),
        shapes: tuple[str, ...] = ("blobs",),
    ) -> None:
        """``textures``: ``[N, 3, H, W]`` in [0, 1]; ``blend``: one of ``BLEND_MODES``; ``beta ~ U(beta_range)``."""
        if textures.dim() != 4 or textures.shape[0] == 0 or textures.shape[1] != 3:
            raise ValueError(f"textures must be [N>0, 3, H, W], got {tuple(textures.shape)}")
        if blend not in BLEND_MODES:
            raise ValueError(f"unknown blend mode {blend!r}; expected one of {BLEND_MODES}")
        shapes = tuple(shapes)
        if not shapes or not set(shapes) <= set(SHAPES) or len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes must be distinct names of {SHAPES}, got {shapes!r}")
        if "lines" in shapes and blend != "draem":
            raise ValueError(f"shapes with 'lines' need blend='draem', got blend={blend!r}")
        self.textures = textures
        self.blend = blend
        self.beta_range = beta_range
        self.shapes = shapes
        self._cache_key: tuple | None = None
        self._cache: torch.Tensor | None = None

    def textures_like(self, images: torch.Tensor) -> torch.Tensor:
        """The textures on the images' device, dtype and size (the converted copy is cached)."""
        key = (images.device, images.dtype, tuple(images.shape[-2:]))
        textures = self._cache
        if textures is None or key != self._cache_key:
            textures = self.textures.to(images.device, images.dtype)
            if textures.shape[-2:] != images.shape[-2:]:
                textures = F.interpolate(
                    textures, size=key[2], mode="bilinear", align_corners=False, antialias=True
                ).clamp(0, 1)
            self._cache_key, self._cache = key, textures
        return textures

    def synth(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-anomalous versions of ``[B, 3, H, W]`` images in [0, 1] and their masks ``[B, 1, H, W]``."""
        batch, device = images.shape[0], images.device
        textures = self.textures_like(images)
        picks = torch.randint(textures.shape[0], (batch,), generator=generator, device=generator.device)
        lam = torch.rand(batch, generator=generator, device=generator.device)
        beta = uniform((batch,), *self.beta_range, generator)
        size = (images.shape[-2], images.shape[-1])
        mask = perlin_mask(batch, size, generator, device).to(images.dtype)
        mixed = fourier_mix(images, textures[picks.to(device)], lam.to(device))
        if "lines" in self.shapes:
            lines = torch.randint(len(self.shapes), (batch,), generator=generator, device=generator.device)
            lines = (lines == self.shapes.index("lines")).to(device).view(batch, 1, 1, 1)
            grey = torch.rand(batch, generator=generator, device=generator.device).to(device, images.dtype)
            line_mask = polyline_mask(batch, size, generator, device).to(images.dtype)
            mask = torch.where(lines, line_mask, mask)
            mixed = torch.where(lines, grey.view(batch, 1, 1, 1).expand_as(images), mixed)
        return blend(images, mixed, mask, beta.to(device), self.blend), mask
