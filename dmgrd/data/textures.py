"""Texture images (e.g. DTD) for DM-GRD's pseudo-anomalies, read from a folder."""

from pathlib import Path

import torch

from dmgrd.data.io import images_in, read_image
from dmgrd.layout import Size, size_pair


def load_textures(
    folder: str | Path, size: Size, limit: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Texture images (e.g. DTD) under ``folder`` as ``[N, 3, H, W]`` in [0, 1], resized bilinearly to ``size``.

    Files are taken recursively in sorted order; with ``limit`` the first ``limit`` of them, or a random subset of
    that many drawn with ``generator`` when one is given.
    """
    files = images_in(Path(folder), "texture folder", recursive=True)
    if limit is not None and generator is not None:
        picks = torch.randperm(len(files), generator=generator, device=generator.device)[:limit]
        files = [files[i] for i in sorted(picks.tolist())]
    elif limit is not None:
        files = files[:limit]
    return torch.stack([read_image(path, size_pair(size)) for path in files])
