"""Random draws shared by the generators: every draw comes from an explicit ``torch.Generator`` (the global torch
and numpy RNGs are never used) and happens on the generator's device, so the same seed gives the same draws
whether the images live on a CPU or a GPU."""

from collections.abc import Sequence

import torch


def uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``U(low, high)`` draws on the generator's device."""
    return low + (high - low) * torch.rand(*shape, generator=generator, device=generator.device)


def per_sample(value: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar (float or ``[B]`` tensor) as ``[B, 1, 1, 1]`` with the images' device and dtype."""
    batch = images.shape[0]
    return torch.as_tensor(value, dtype=images.dtype, device=images.device).expand(batch).reshape(batch, 1, 1, 1)


def randint_below(high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from ``U{0 .. high-1}`` per entry of the int64 tensor ``high``, drawn on the generator's device
    and returned on the CPU."""
    uniform = torch.rand(high.shape, generator=generator, device=generator.device).cpu()
    return (uniform * high.cpu()).long()
