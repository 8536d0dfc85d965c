"""Per-pixel cosine-distance anomaly map (the scoring hot path of every reverse-distillation method).

For each pyramid level ``l`` the map is ``1 - cos_c(T_l, S_l)`` at every pixel (cosine over channels,
accumulated in float32 whatever the input dtype), bilinearly resized to ``out_size`` with
``align_corners=True``, combined over levels (``sum``, ``mean`` or ``mul``) and finally blurred with a
Gaussian of standard deviation ``sigma`` with :func:`scipy.ndimage.gaussian_filter` semantics
(truncate 4, i.e. radius ``int(4 * sigma + 0.5)``, mode ``"reflect"``).

:func:`anomaly_map_reference` is the definition; the C++, CUDA and Triton backends are checked against it.
"""

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dmgrd.layout import size_pair
from dmgrd.numerics import COSINE_EPS, accumulation_dtype, gaussian_weights
from dmgrd.ops._dispatch import Op, extension_op, register_fake, triton_kernel

REDUCTIONS = ("sum", "mean", "mul")


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map any integer index into ``[0, size)`` by half-sample symmetric reflection (scipy mode ``reflect``)."""
    period = 2 * size
    m = torch.remainder(index, period)
    return torch.where(m >= size, period - 1 - m, m)


def gaussian_blur_reference(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[..., H, W]`` maps, equal to scipy ``gaussian_filter(mode="reflect")``."""
    if sigma == 0:
        return maps
    weights = gaussian_weights(sigma, maps.dtype, maps.device)
    radius = (weights.numel() - 1) // 2
    shape = maps.shape
    out = maps.reshape(-1, 1, *shape[-2:])
    for dim, kernel_shape in ((-2, (-1, 1)), (-1, (1, -1))):
        size = out.shape[dim]
        taps = reflect_index(torch.arange(-radius, size + radius, device=maps.device), size)
        out = F.conv2d(out.index_select(dim, taps), weights.view(1, 1, *kernel_shape))
    return out.reshape(shape)


def cosine_distance_reference(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` over channels of two ``[B, C, H, W]`` maps, computed in float32 (float64 stays float64)."""
    acc = accumulation_dtype(teacher.dtype)
    t, s = teacher.to(acc), student.to(acc)
    dot = (t * s).sum(1)
    t_norm = t.square().sum(1).sqrt().clamp_min(COSINE_EPS)
    s_norm = s.square().sum(1).sqrt().clamp_min(COSINE_EPS)
    return 1.0 - dot / (t_norm * s_norm)


def anomaly_map_reference(
    teacher_feats: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    out_size: Sequence[int],
    reduce: str = "sum",
    sigma: float = 4.0,
) -> torch.Tensor:
    """Pure-torch definition of :func:`anomaly_map` (no input checks; use the public function)."""
    levels = [F.interpolate(cosine_distance_reference(t, s).unsqueeze(1), size=tuple(out_size), mode="bilinear",
                            align_corners=True) for t, s in zip(teacher_feats, student_feats, strict=True)]
    combined = functools.reduce(torch.mul if reduce == "mul" else torch.add, levels)
    if reduce == "mean":
        combined = combined / len(teacher_feats)
    return gaussian_blur_reference(combined, sigma)


def _as_levels(feats, name: str) -> list[torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    if not isinstance(feats, Sequence) or not all(isinstance(f, torch.Tensor) for f in feats):
        raise ValueError(f"{name} must be a list of [B, C, H, W] tensors, got {type(feats).__name__}")
    if len(feats) == 0:
        raise ValueError(f"{name} is empty: give at least one feature level")
    return list(feats)


def check_feature_pairs(teacher_feats, student_feats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student feature levels as lists, checked to pair up: 4-D floating tensors on one device, the
    same shape per level, one batch size, nothing empty; a level's two dtypes are promoted to a common one.
    The ValueError names the first level and tensor that fails."""
    teacher = _as_levels(teacher_feats, "teacher_feats")
    student = _as_levels(student_feats, "student_feats")
    if len(teacher) != len(student):
        raise ValueError(f"teacher_feats has {len(teacher)} levels but student_feats has {len(student)}")
    batch, device = teacher[0].shape[0] if teacher[0].dim() == 4 else None, teacher[0].device
    out_t, out_s = [], []
    for level, (t, s) in enumerate(zip(teacher, student, strict=True)):
        for name, x in (("teacher_feats", t), ("student_feats", s)):
            if x.dim() != 4:
                raise ValueError(f"{name}[{level}] must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise ValueError(f"{name}[{level}] must be floating point, got {x.dtype}")
            if x.device != device:
                raise ValueError(f"{name}[{level}] is on {x.device} but teacher_feats[0] is on {device}")
        if t.shape[0] != s.shape[0]:
            raise ValueError(f"level {level}: teacher batch {t.shape[0]} != student batch {s.shape[0]}")
        if t.shape[2:] != s.shape[2:]:
            raise ValueError(
                f"level {level}: teacher spatial size {tuple(t.shape[2:])} != student spatial size {tuple(s.shape[2:])}"
            )
        if t.shape[1] != s.shape[1]:
            raise ValueError(f"level {level}: teacher has {t.shape[1]} channels but student has {s.shape[1]}")
        if t.shape[0] != batch:
            raise ValueError(f"level {level} has batch {t.shape[0]} but level 0 has batch {batch}")
        if min(t.shape[1:]) == 0:
            raise ValueError(f"level {level} has an empty channel or spatial dimension: {tuple(t.shape)}")
        if t.dtype != s.dtype:
            common = torch.promote_types(t.dtype, s.dtype)
            t, s = t.to(common), s.to(common)
        out_t.append(t)
        out_s.append(s)
    return out_t, out_s


OP = Op("anomaly_map", reference=anomaly_map_reference, ext=extension_op("anomaly_map"),
        triton=triton_kernel("anomaly_map", "anomaly_map_triton"))


def anomaly_map(
    teacher_feats: Sequence[torch.Tensor] | torch.Tensor,
    student_feats: Sequence[torch.Tensor] | torch.Tensor,
    out_size: int | Sequence[int],
    reduce: str = "sum",
    sigma: float = 4.0,
) -> torch.Tensor:
    """Anomaly map ``[B, 1, H, W]`` from teacher and student feature pyramids.

    Args:
        teacher_feats: one ``[B, C_l, H_l, W_l]`` tensor per level (any float dtype, any memory layout).
        student_feats: the student's features, same shapes as ``teacher_feats``.
        out_size: output ``(H, W)`` (or one int for a square map).
        reduce: how levels are combined: ``"sum"`` (RD4AD), ``"mean"`` or ``"mul"``.
        sigma: Gaussian blur standard deviation in output pixels; ``0`` disables the blur.

    Returns:
        float32 map (float64 for float64 inputs) on the inputs' device. NaN in the inputs propagates.
    """
    teacher, student = check_feature_pairs(teacher_feats, student_feats)
    size = size_pair(out_size, "out_size")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if teacher[0].shape[0] == 0:
        return teacher[0].new_empty((0, 1, *size), dtype=accumulation_dtype(teacher[0].dtype))
    return OP(teacher + student, teacher, student, size, reduce, sigma)


@register_fake("anomaly_map")
def _anomaly_map_shapes(teacher, student, out_size, reduce, sigma):
    dtype = accumulation_dtype(teacher[0].dtype)
    return teacher[0].new_empty((teacher[0].shape[0], 1, out_size[0], out_size[1]), dtype=dtype)
