"""The gating of DM-GRD's MSFF attention (SPEC §4.4), the op after its 7x7 convolution.

MSFF gates its fused features ``f_l`` (level 1 finest, level L coarsest) with spatial-attention masks built
from its inputs ``x_l``: ``sam(x) = sigmoid(conv7x7([max_c x, mean_c x]))`` (the pooling is
:func:`dmgrd.ops.channel_pool`), ``m_L = sam(x_L)``, ``m_l = sam(x_l) * up(m_{l+1})`` (bilinear,
``align_corners=True``, to level ``l``'s size, which need not be an exact double), outputs ``f_l * m_l``.
:func:`fuse_pyramid` ``(features, logits) -> [f_l * m_l]`` takes the convolution's outputs ``a_l``
(``sam(x_l) = sigmoid(a_l)``), computes the small mask maps, then writes each output in one pass.

Differentiable in every backend, with the reference's gradients. The fast backends compute in float32
(float64 for float64 inputs) and round once; the reference rounds each step.
"""

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dmgrd.layout import dense_like
from dmgrd.ops._dispatch import Op, register_fake
from dmgrd.ops.channel_pool import check_map


def upsample_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` resized bilinearly (``align_corners=True``) to ``like``'s spatial size."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def attention_masks_reference(logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Masks ``m_l`` from the logits ``a_l``, finest first: ``m_L = σ(a_L)``, ``m_l = σ(a_l) · up(m_{l+1})``."""
    masks = [torch.sigmoid(logits[-1])]
    for a in reversed(logits[:-1]):
        masks.insert(0, torch.sigmoid(a) * upsample_like(masks[0], a))
    return masks


def fuse_pyramid_reference(features: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Pure-torch definition of :func:`fuse_pyramid` (no input checks; use the public function)."""
    return [f * m for f, m in zip(features, attention_masks_reference(logits), strict=True)]


class _FusePyramid(torch.autograd.Function):
    """fuse_pyramid through a backend's kernels: ``forward(features, logits) -> outputs`` and
    ``backward(grads, features, logits) -> (grad_features, grad_logits)``; ``tensors`` is features + logits."""

    @staticmethod
    def forward(ctx, forward: Callable, backward: Callable, *tensors: torch.Tensor):
        levels = len(tensors) // 2
        ctx.save_for_backward(*tensors)
        ctx.backward_kernel = backward
        return tuple(forward(list(tensors[:levels]), list(tensors[levels:])))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        tensors = ctx.saved_tensors
        levels = len(tensors) // 2
        grad_features, grad_logits = ctx.backward_kernel(list(grads), list(tensors[:levels]), list(tensors[levels:]))
        return None, None, *grad_features, *grad_logits


def _ext_fuse_pyramid(features, logits):
    return list(_FusePyramid.apply(torch.ops.dmgrd.fuse_pyramid, torch.ops.dmgrd.fuse_pyramid_backward,
                                   *features, *logits))


def _triton_fuse_pyramid(features, logits):
    from dmgrd.kernels import fuse_pyramid as kernels

    return list(_FusePyramid.apply(kernels.fuse_pyramid_triton, kernels.fuse_pyramid_backward_triton,
                                   *features, *logits))


OP = Op("fuse_pyramid", reference=fuse_pyramid_reference, ext=_ext_fuse_pyramid, triton=_triton_fuse_pyramid,
        differentiable=True)


def _as_levels(tensors, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(
            f"{name} must be a list of [B, C, H, W] tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty: give at least one level")
    for level, x in enumerate(tensors):
        check_map(x, f"{name}[{level}]")
    return list(tensors)


def _check_pyramid(features, logits) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    features, logits = _as_levels(features, "features"), _as_levels(logits, "logits")
    if len(features) != len(logits):
        raise ValueError(f"features has {len(features)} levels but logits has {len(logits)}")
    batch, device = features[0].shape[0], features[0].device
    for level, (f, a) in enumerate(zip(features, logits, strict=True)):
        if a.shape[1] != 1 or a.shape[0] != f.shape[0] or a.shape[2:] != f.shape[2:]:
            raise ValueError(f"level {level}: logits must be [B, 1, H, W] for features {tuple(f.shape)}, "
                             f"got {tuple(a.shape)}")
        if f.shape[0] != batch:
            raise ValueError(f"level {level} has batch {f.shape[0]} but level 0 has batch {batch}")
        if f.device != device or a.device != device:
            raise ValueError(f"level {level}: every tensor must be on {device}, got {f.device} and {a.device}")
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in features + logits])
    return [f.to(dtype) for f in features], [a.to(dtype) for a in logits]


def fuse_pyramid(features: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """MSFF's gated outputs ``[f_l * m_l]`` with the attention masks chained coarse to fine (module docstring).

    Args:
        features: ``[B, C_l, H_l, W_l]`` per level, finest first (any memory layout).
        logits: the spatial-attention logits ``[B, 1, H_l, W_l]`` per level (before the sigmoid).

    Returns:
        One tensor per level, shaped like its features, in the common dtype of the inputs; differentiable
        with respect to features and logits.
    """
    features, logits = _check_pyramid(features, logits)
    if features[0].shape[0] == 0:
        return fuse_pyramid_reference(features, logits)
    return OP(features + logits, features, logits)


@register_fake("fuse_pyramid")
def _fuse_pyramid_shapes(features, logits):
    return [dense_like(f) for f in features]


@register_fake("fuse_pyramid_backward")
def _fuse_pyramid_backward_shapes(grads, features, logits):
    grad_logits = [torch.empty_like(a, memory_format=torch.contiguous_format) for a in logits]
    return [dense_like(f) for f in features], grad_logits
