"""RD++'s simplex-noise patches (SPEC §3.3): batched 3-D simplex noise, its fractal sum, and noisy rectangles."""

import torch

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
        steps = [torch.as_tensor(c, device=points.device).long() for c in corner]
        offset = [o - c + n * _UNSKEW3 for o, c in zip(origin, steps, strict=True)]
        i, j, k = (base + c for base, c in zip(lattice, steps, strict=True))
        gradient = gradients[lookup(i + lookup(j + lookup(k))) % len(_SIMPLEX_GRADIENTS)].unbind(-1)
        falloff = (0.6 - offset[0] * offset[0] - offset[1] * offset[1] - offset[2] * offset[2]).clamp_min(0)
        total = total + falloff**4 * (gradient[0] * offset[0] + gradient[1] * offset[1] + gradient[2] * offset[2])
    return 32 * total


def fractal_simplex3(points: torch.Tensor, permutation: torch.Tensor, octaves: int = 6,
                     persistence: float = 0.6) -> torch.Tensor:
    """Σ_o persistence^o · simplex(2^o · points) over ``octaves`` octaves, unnormalised (the RD++ code's
    ``rand_3d_octaves``: its "frequency" divides the coordinates and halves every octave)."""
    return torch.stack([persistence**o * simplex_noise3(points * 2**o, permutation) for o in range(octaves)]).sum(0)


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
