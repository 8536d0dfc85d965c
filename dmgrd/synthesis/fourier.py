"""Fourier amplitude mixing of images with textures, and the blends that paste the mix inside a mask (SPEC §4.2)."""

import math

import torch

from dmgrd.synthesis.draws import per_sample

BLEND_MODES = ("dmgrd_legacy", "draem")


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
    weight = per_sample(lam, images) * _low_frequency_window(height, width, window, images.device)
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
    beta = per_sample(beta, images)
    if mode == "dmgrd_legacy":
        return mixed * (2 - beta - mask * (1 - beta))
    if mode == "draem":
        return ((1 - mask) * images + mask * ((1 - beta) * mixed + beta * images)).clamp(0, 1)
    raise ValueError(f"unknown blend mode {mode!r}; expected one of {BLEND_MODES}")
