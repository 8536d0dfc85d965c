"""The parameter-free part of DM-GRD's MSFF attention (SPEC §4.4), as two ops around its 7x7 convolution.

MSFF gates its fused features ``f_l`` (level 1 finest, level L coarsest) with spatial-attention masks built
from its inputs ``x_l``: ``sam(x) = sigmoid(conv7x7([max_c x, mean_c x]))``, ``m_L = sam(x_L)``,
``m_l = sam(x_l) * up(m_{l+1})`` (bilinear, ``align_corners=True``, to level ``l``'s size, which need not
be an exact double), outputs ``f_l * m_l``. The convolution stays in torch; around it:

- :func:`channel_pool` ``x -> [max_c x, mean_c x]`` reads ``x`` once (the convolution's input);
- :func:`fuse_pyramid` ``(features, logits) -> [f_l * m_l]`` takes the convolution's outputs ``a_l``
  (``sam(x_l) = sigmoid(a_l)``) and computes the small mask maps, then writes each output in one pass.

Both are differentiable in every backend, with the reference's gradients: the channel max passes its
gradient to the channels that reach it, split evenly among ties (as ``torch.amax``). The fast backends
compute in float32 (float64 for float64 inputs) and round once; the reference rounds each step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dmgrd import _extension
from dmgrd.ops._dispatch import Op


def channel_pool_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch definition of :func:`channel_pool` (no input checks; use the public function)."""
    return torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)


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


class _ChannelPool(torch.autograd.Function):
    """channel_pool through a backend's kernels: ``forward(x) -> (pooled, ties)`` and
    ``backward(grad, x, pooled, ties)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward: Callable, backward: Callable) -> torch.Tensor:
        pooled, ties = forward(x)
        ctx.save_for_backward(x, pooled, ties)
        ctx.backward_kernel = backward
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return ctx.backward_kernel(grad, *ctx.saved_tensors), None, None


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


def _ext_channel_pool(x):
    return _ChannelPool.apply(x, torch.ops.dmgrd.channel_pool, torch.ops.dmgrd.channel_pool_backward)


def _triton_channel_pool(x):
    from dmgrd.kernels import fuse_pyramid as kernels

    return _ChannelPool.apply(x, kernels.channel_pool_triton, kernels.channel_pool_backward_triton)


def _ext_fuse_pyramid(features, logits):
    return list(_FusePyramid.apply(torch.ops.dmgrd.fuse_pyramid, torch.ops.dmgrd.fuse_pyramid_backward,
                                   *features, *logits))


def _triton_fuse_pyramid(features, logits):
    from dmgrd.kernels import fuse_pyramid as kernels

    return list(_FusePyramid.apply(kernels.fuse_pyramid_triton, kernels.fuse_pyramid_backward_triton,
                                   *features, *logits))


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHANNEL_POOL_OP = Op("channel_pool", reference=channel_pool_reference, ext=_ext_channel_pool,
                     triton=_triton_channel_pool, triton_dtypes=TRITON_DTYPES, differentiable=True)
OP = Op("fuse_pyramid", reference=fuse_pyramid_reference, ext=_ext_fuse_pyramid, triton=_triton_fuse_pyramid,
        triton_dtypes=TRITON_DTYPES, differentiable=True)


def _check_map(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")  # noqa: TRY004 (bad input: ValueError)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if min(x.shape[1:]) == 0:
        raise ValueError(f"{name} has an empty channel or spatial dimension: {tuple(x.shape)}")


def channel_pool(x: torch.Tensor) -> torch.Tensor:
    """Channel max and mean of ``x`` ``[B, C, H, W]``: ``[B, 2, H, W]`` (index 0 max, 1 mean), in x's dtype.

    CBAM's spatial-attention input. Any memory layout; NaN propagates to both maps; differentiable.
    """
    _check_map(x, "x")
    if x.shape[0] == 0:
        return channel_pool_reference(x)
    return CHANNEL_POOL_OP([x], x)


def _as_levels(tensors, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(  # noqa: TRY004 (bad input: ValueError)
            f"{name} must be a list of [B, C, H, W] tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty: give at least one level")
    for level, x in enumerate(tensors):
        _check_map(x, f"{name}[{level}]")
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


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """The fast paths' output for input ``x``: empty, channels_last if x is channels_last only, else contiguous."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _register_fake() -> None:
    @torch.library.register_fake("dmgrd::channel_pool")
    def _(x):
        batch, _, height, width = x.shape
        return x.new_empty((batch, 2, height, width)), x.new_empty((batch, height, width), dtype=torch.int32)

    @torch.library.register_fake("dmgrd::channel_pool_backward")
    def _(grad, x, pooled, ties):
        return dense_like(x)

    @torch.library.register_fake("dmgrd::fuse_pyramid")
    def _(features, logits):
        return [dense_like(f) for f in features]

    @torch.library.register_fake("dmgrd::fuse_pyramid_backward")
    def _(grads, features, logits):
        grad_logits = [torch.empty_like(a, memory_format=torch.contiguous_format) for a in logits]
        return [dense_like(f) for f in features], grad_logits


if _extension.loaded():
    _register_fake()
