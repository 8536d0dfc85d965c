"""Pseudo-anomaly synthesis: DM-GRD's Perlin masks, Fourier amplitude mixing and blending (SPEC §4.2), and
RD++'s simplex-noise patches (SPEC §3.3).

Every random draw comes from an explicit ``torch.Generator`` (the global torch and numpy RNGs are never used).
The draws are small (lattice angles, scales, per-sample scalars) and happen on the generator's device; the
per-pixel work is batched torch on the device of the images, so the same seed gives the same draws whether
the images live on a CPU or a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import noise
import numpy as np
import torch
import torch.nn.functional as F

from dmgrd.data.io import IMAGE_SUFFIXES, read_image
from dmgrd.ops.anomaly_map import cosine_distance_reference

BLEND_MODES = ("dmgrd_legacy", "draem")
TEXTURE_OCTAVES = 4
TEXTURE_FREQUENCY_RANGE = (2.0, 16.0)  # base Perlin cycles across the texture
TEXTURE_OFFSET_RANGE = 256.0
TEXTURE_CONTRAST_RANGE = (0.25, 0.75)  # cyclic shift from the first colour to the second, per channel

Size = int | Sequence[int]


def _pair(size: Size) -> tuple[int, int]:
    """``(H, W)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _per_sample(value: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar (float or ``[B]`` tensor) as ``[B, 1, 1, 1]`` with the images' device and dtype."""
    batch = images.shape[0]
    return torch.as_tensor(value, dtype=images.dtype, device=images.device).expand(batch).reshape(batch, 1, 1, 1)


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``U(low, high)`` draws on the generator's device."""
    return low + (high - low) * torch.rand(*shape, generator=generator, device=generator.device)


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
    height, width = _pair(size)
    device = generator.device if device is None else torch.device(device)
    res = _resolution(res, batch)
    rows, cols = (int(r) + 1 for r in res.max(dim=0).values)
    angles = _uniform((batch, rows, cols), 0.0, 2 * math.pi, generator).to(device)
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
        maps = rotate_maps(maps, _uniform((batch,), -90.0, 90.0, generator))
    return (maps > threshold).float()


def _low_frequency_window(height: int, width: int, window: float, device) -> torch.Tensor:
    """Boolean ``[H, W]`` window of half-size ``floor(window * min(H, W))`` around DC, in unshifted FFT layout.

    The window is built centred (as FDA does on ``fftshift``-ed amplitudes) and moved back with ``ifftshift``,
    which selects the same frequencies without shifting the spectra themselves.
    """
    half = math.floor(window * min(height, width))
    rows = (torch.arange(height, device=device) - height // 2).abs() <= half
    cols = (torch.arange(width, device=device) - width // 2).abs() <= half
    return torch.fft.ifftshift(rows[:, None] & cols[None, :])


def fourier_mix(
    images: torch.Tensor, textures: torch.Tensor, lam: torch.Tensor | float, window: float = 0.1
) -> torch.Tensor:
    """FDA low-frequency amplitude mixing (SPEC §4.2) of ``[B, 3, H, W]`` images with same-size textures.

    Inside the low-frequency window the amplitude becomes ``lam * A_tex + (1 - lam) * A_img`` (``lam`` float or
    ``[B]``); the image's phase is kept and the real part of the inverse FFT returned, unclipped.
    """
    if images.shape != textures.shape:
        raise ValueError(f"images {tuple(images.shape)} and textures {tuple(textures.shape)} must match")
    height, width = images.shape[-2:]
    spectrum = torch.fft.fft2(images)
    amplitude = spectrum.abs()
    weight = _per_sample(lam, images) * _low_frequency_window(height, width, window, images.device)
    mixed = amplitude + weight * (torch.fft.fft2(textures).abs() - amplitude)
    return torch.fft.ifft2(torch.polar(mixed, spectrum.angle())).real.to(images.dtype)


def blend(
    images: torch.Tensor, mixed: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor | float, mode: str
) -> torch.Tensor:
    """Blend the Fourier-mixed images into the originals under ``mask`` (``beta`` float or ``[B]``).

    ``"dmgrd_legacy"``: ``mixed * (2 - beta - mask * (1 - beta))``, unclipped (the official code; it brightens
    everything outside the mask). ``"draem"``: ``(1 - mask) * images + mask * ((1 - beta) * mixed + beta * images)``
    clipped to [0, 1].
    """
    beta = _per_sample(beta, images)
    if mode == "dmgrd_legacy":
        return mixed * (2 - beta - mask * (1 - beta))
    if mode == "draem":
        return ((1 - mask) * images + mask * ((1 - beta) * mixed + beta * images)).clamp(0, 1)
    raise ValueError(f"unknown blend mode {mode!r}; expected one of {BLEND_MODES}")


_pnoise2 = np.frompyfunc(noise.pnoise2, 3, 1)


def procedural_textures(count: int, size: Size, generator: torch.Generator) -> torch.Tensor:
    """``count`` RGB textures ``[count, 3, H, W]`` in [0, 1] from ``noise.pnoise2`` (a DTD stand-in).

    Each texture has a random base frequency and offset; its noise, stretched to [0, 1], interpolates
    between two random colours that differ by at least 0.25 in every channel.
    """
    height, width = _pair(size)
    frequency = _uniform((count, 2), *TEXTURE_FREQUENCY_RANGE, generator).cpu().numpy()
    offset = _uniform((count, 2), 0.0, TEXTURE_OFFSET_RANGE, generator).cpu().numpy()
    first = torch.rand(count, 3, 1, 1, generator=generator, device=generator.device).cpu()
    second = (first + _uniform((count, 3, 1, 1), *TEXTURE_CONTRAST_RANGE, generator).cpu()) % 1
    ys = np.arange(height) / height * frequency[:, 0, None] + offset[:, 0, None]
    xs = np.arange(width) / width * frequency[:, 1, None] + offset[:, 1, None]
    values = torch.from_numpy(_pnoise2(xs[:, None, :], ys[:, :, None], TEXTURE_OCTAVES).astype(np.float32))
    low = values.amin(dim=(1, 2), keepdim=True)
    high = values.amax(dim=(1, 2), keepdim=True)
    t = ((values - low) / (high - low).clamp_min(1e-12))[:, None]
    return torch.lerp(first, second, t)


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files under ``folder`` (recursive); raises if the folder is missing or has none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"texture folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {folder}")
    return files


def load_textures(
    folder: str | Path, size: Size, limit: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Texture images (e.g. DTD) under ``folder`` as ``[N, 3, H, W]`` in [0, 1], resized bilinearly to ``size``.

    Files are taken recursively in sorted order; with ``limit`` the first ``limit`` of them, or a random subset of
    that many drawn with ``generator`` when one is given.
    """
    files = _image_files(Path(folder))
    if limit is not None and generator is not None:
        picks = torch.randperm(len(files), generator=generator, device=generator.device)[:limit]
        files = [files[i] for i in sorted(picks.tolist())]
    elif limit is not None:
        files = files[:limit]
    height, width = _pair(size)
    return torch.stack([read_image(path, (height, width)) for path in files])


class AnomalySynthesizer:
    """Batched DM-GRD pseudo-anomalies: Perlin mask, FDA mix with a random texture, then a blend (SPEC §4.2)."""

    def __init__(
        self, textures: torch.Tensor, blend: str = "draem", beta_range: tuple[float, float] = (0.0, 0.8)
    ) -> None:
        """``textures``: ``[N, 3, H, W]`` in [0, 1]; ``blend``: one of ``BLEND_MODES``; ``beta ~ U(beta_range)``."""
        if textures.dim() != 4 or textures.shape[0] == 0 or textures.shape[1] != 3:
            raise ValueError(f"textures must be [N>0, 3, H, W], got {tuple(textures.shape)}")
        if blend not in BLEND_MODES:
            raise ValueError(f"unknown blend mode {blend!r}; expected one of {BLEND_MODES}")
        self.textures = textures
        self.blend = blend
        self.beta_range = beta_range
        self._cache_key: tuple | None = None
        self._cache: torch.Tensor | None = None

    @classmethod
    def from_source(
        cls, source: str | Path | None, size: Size, generator: torch.Generator, count: int = 64, **kwargs
    ) -> AnomalySynthesizer:
        """Synthesiser over ``count`` textures: a random subset of a texture folder, or procedural if ``None``."""
        if source is None:
            textures = procedural_textures(count, size, generator)
        else:
            textures = load_textures(source, size, limit=count, generator=generator)
        return cls(textures, **kwargs)

    def textures_like(self, images: torch.Tensor) -> torch.Tensor:
        """The textures on the images' device, dtype and size (the converted copy is cached)."""
        key = (images.device, images.dtype, tuple(images.shape[-2:]))
        if key != self._cache_key:
            textures = self.textures.to(images.device, images.dtype)
            if textures.shape[-2:] != images.shape[-2:]:
                textures = F.interpolate(
                    textures, size=key[2], mode="bilinear", align_corners=False, antialias=True
                ).clamp(0, 1)
            self._cache_key, self._cache = key, textures
        return self._cache

    def synth(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-anomalous versions of ``[B, 3, H, W]`` images in [0, 1] and their masks ``[B, 1, H, W]``."""
        batch, device = images.shape[0], images.device
        textures = self.textures_like(images)
        picks = torch.randint(textures.shape[0], (batch,), generator=generator, device=generator.device)
        lam = torch.rand(batch, generator=generator, device=generator.device)
        beta = _uniform((batch,), *self.beta_range, generator)
        mask = perlin_mask(batch, images.shape[-2:], generator, device).to(images.dtype)
        mixed = fourier_mix(images, textures[picks.to(device)], lam.to(device))
        return blend(images, mixed, mask, beta.to(device), self.blend), mask


# --- DRD self cut-paste (SPEC §7.1, §7.2) -------------------------------------------------------------

CUTPASTE_REFERENCE_SIDE = 256
# (smallest side, largest side, probability) at a 256-pixel image: large, medium and small patches
CUTPASTE_SIZES = ((150, 200, 0.2), (64, 100, 0.3), (10, 32, 0.5))


def _randint_below(high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from ``U{0 .. high-1}`` per entry of the int64 tensor ``high``, drawn on the generator's device
    and returned on the CPU."""
    uniform = torch.rand(high.shape, generator=generator, device=generator.device).cpu()
    return (uniform * high.cpu()).long()


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
    sides = low[component] + _randint_below((high - low + 1).long()[component], generator)
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
        _window_indices(length, sides, _randint_below(length - sides, generator),
                        1 + _randint_below(length - sides - 2, generator), images.device)
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


# -- RD++ simplex-noise patches (SPEC §3.3) -----------------------------------------------------------------

SIMPLEX_PERIOD = 256
_SKEW3, _UNSKEW3 = 1.0 / 3.0, 1.0 / 6.0
_SIMPLEX_GRADIENTS = ((1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0), (1, 0, 1), (-1, 0, 1), (1, 0, -1), (-1, 0, -1),
                      (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1))  # the 12 cube edges


def simplex_permutations(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random permutation tables ``[count, 256]`` (int64) for :func:`simplex_noise3`."""
    return torch.rand(count, SIMPLEX_PERIOD, generator=generator, device=generator.device).argsort(dim=1)


def simplex_noise3(points: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Classic 3-D simplex noise (Perlin 2001 in Gustavson's formulation, ``noise.perlin.SimplexNoise.noise3``)
    in about [-1, 1] at ``points`` ``[B, N, 3]`` (x, y, z), with one permutation table per batch item
    (``[B, 256]``) or one for all (``[256]``). Computed in the points' dtype on their device, in the reference's
    order of operations: its kernel radius² 0.6 makes the noise jump slightly across simplex faces, so points on
    a face (e.g. integer coordinates) depend on how the rounding picks the simplex.
    """
    batch = points.shape[0]
    table = permutation.to(points.device).long().expand(batch, SIMPLEX_PERIOD).repeat(1, 2)  # no wrap-around

    def lookup(index: torch.Tensor) -> torch.Tensor:
        return torch.gather(table, 1, index)

    coords = points.unbind(-1)  # per-component [B, N] tensors: reductions over a size-3 last dim are slow
    skew = sum(coords) * _SKEW3
    cell = [(c + skew).floor() for c in coords]
    unskew = sum(cell) * _UNSKEW3
    x, y, z = origin = [c - (i - unskew) for c, i in zip(coords, cell, strict=True)]  # position in the cell, unskewed
    x_ge_y, y_ge_z, x_ge_z = x >= y, y >= z, x >= z
    x_first, y_first = x_ge_y & x_ge_z, ~x_ge_y & y_ge_z
    largest = (x_first, y_first, ~(x_first | y_first))
    two_largest = (x_ge_y | x_ge_z, ~x_ge_y | y_ge_z, ~(y_ge_z & x_ge_z))
    lattice = [i.long() % SIMPLEX_PERIOD for i in cell]
    gradients = torch.tensor(_SIMPLEX_GRADIENTS, dtype=points.dtype, device=points.device)
    total = torch.zeros_like(x)
    for n, corner in enumerate(((0, 0, 0), largest, two_largest, (1, 1, 1))):
        corner = [torch.as_tensor(c, device=points.device).long() for c in corner]
        offset = [o - c + n * _UNSKEW3 for o, c in zip(origin, corner, strict=True)]
        i, j, k = (base + c for base, c in zip(lattice, corner, strict=True))
        gradient = gradients[lookup(i + lookup(j + lookup(k))) % len(_SIMPLEX_GRADIENTS)].unbind(-1)
        falloff = (0.6 - offset[0] * offset[0] - offset[1] * offset[1] - offset[2] * offset[2]).clamp_min(0)
        total = total + falloff**4 * (gradient[0] * offset[0] + gradient[1] * offset[1] + gradient[2] * offset[2])
    return 32 * total


def fractal_simplex3(points: torch.Tensor, permutation: torch.Tensor, octaves: int = 6,
                     persistence: float = 0.6) -> torch.Tensor:
    """Σ_o persistence^o · simplex(2^o · points) over ``octaves`` octaves, unnormalised (the RD++ code's
    ``rand_3d_octaves``: its "frequency" divides the coordinates and halves every octave)."""
    return sum(persistence**o * simplex_noise3(points * 2**o, permutation) for o in range(octaves))


def _noise_tile(channels: int, size: int, permutation: torch.Tensor, frequency: float, octaves: int,
                persistence: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Fractal simplex noise ``[P, channels, size, size]`` at (column, row, channel) / ``frequency``, one tile per
    permutation table (``P = 1`` for a shared ``[256]`` table)."""
    tables = permutation.reshape(-1, SIMPLEX_PERIOD)
    axes = [torch.arange(n, dtype=dtype, device=device) / frequency for n in (channels, size, size)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)  # [C, S, S, (x, y, z)]
    points = grid.reshape(1, -1, 3).expand(tables.shape[0], -1, -1)
    return fractal_simplex3(points, tables, octaves, persistence).reshape(-1, channels, size, size)


def simplex_patch(
    images: torch.Tensor,
    generator: torch.Generator,
    permutation: torch.Tensor | None = None,
    size_range: tuple[int, int] = (10, 31),
    strength: float = 0.2,
    octaves: int = 6,
    persistence: float = 0.6,
    frequency: float = 32.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RD++ noisy images (SPEC §3.3) of ``[B, C, H, W]`` images in [0, 1], and the patch masks ``[B, 1, H, W]``.

    Per image: one rectangle with height and width ~ U{size_range} (inclusive) at a top-left corner drawn in
    ``[1, H - h) x [1, W - w)``; inside it ``strength`` times C-channel fractal 3-D simplex noise (``octaves``,
    ``persistence``, ``frequency``; the noise's origin at the rectangle's corner) is added, without clipping.
    The teacher normalises its inputs itself, so this is the official "add to the [0, 1] image, then normalise".
    ``permutation``: the simplex table, ``[256]`` shared by every image (the official code: one field, so each
    image gets a crop of the same noise) or ``[B, 256]``; default: a fresh table per image from ``generator``.
    Every draw comes from ``generator`` (on its device); the noise is computed on the images' device.
    """
    batch, channels, height, width = images.shape
    low, high = size_range
    if not 1 <= low <= high or high > min(height, width) - 2:
        raise ValueError(f"size_range must satisfy 1 <= low <= high <= min(H, W) - 2 = {min(height, width) - 2}, "
                         f"got {size_range}")
    if permutation is not None and tuple(permutation.shape) not in ((SIMPLEX_PERIOD,), (batch, SIMPLEX_PERIOD)):
        raise ValueError(f"permutation must be [{SIMPLEX_PERIOD}] or [{batch}, {SIMPLEX_PERIOD}], "
                         f"got {tuple(permutation.shape)}")
    device, dtype = images.device, torch.promote_types(images.dtype, torch.float32)
    sizes = torch.randint(low, high + 1, (batch, 2), generator=generator, device=generator.device)
    room = torch.tensor([height, width], device=generator.device) - sizes - 1  # corners 1 .. dim - size - 1
    corners = 1 + (torch.rand(batch, 2, generator=generator, device=generator.device) * room).long()
    if permutation is None:
        permutation = simplex_permutations(batch, generator)
    tiles = _noise_tile(channels, high, permutation, frequency, octaves, persistence, dtype, device)
    sizes, corners = sizes.to(device), corners.to(device)
    rows = torch.arange(height, device=device) - corners[:, :1]  # [B, H] position inside the rectangle
    cols = torch.arange(width, device=device) - corners[:, 1:]
    inside = (((rows >= 0) & (rows < sizes[:, :1]))[:, :, None] & ((cols >= 0) & (cols < sizes[:, 1:]))[:, None, :])
    tile_index = torch.arange(batch, device=device) % tiles.shape[0]  # one shared tile or one per image
    patch = tiles[tile_index[:, None, None], :, rows.clamp(0, high - 1)[:, :, None], cols.clamp(0, high - 1)[:, None]]
    mask = inside[:, None].to(dtype)
    noisy = images.to(dtype) + strength * patch.permute(0, 3, 1, 2) * mask
    return noisy.to(images.dtype), mask.to(images.dtype)
