"""Channel max and mean of a feature map, ``[max_c x, mean_c x]``: the input of CBAM's spatial attention (DM-GRD's
MSFF, SPEC §4.4), read in one pass. Differentiable in every backend, with the reference's gradients: the max
passes its gradient to the channels that reach it, split evenly among ties (as ``torch.amax``). The fast
backends compute in float32 (float64 for float64 inputs) and round once.
"""

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from dmgrd.layout import dense_like
from dmgrd.ops._dispatch import Op, register_fake


def channel_pool_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch definition of :func:`channel_pool` (no input checks; use the public function)."""
    return torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)


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


def _ext_channel_pool(x):
    return _ChannelPool.apply(x, torch.ops.dmgrd.channel_pool, torch.ops.dmgrd.channel_pool_backward)


def _triton_channel_pool(x):
    from dmgrd.kernels import channel_pool as kernels

    return _ChannelPool.apply(x, kernels.channel_pool_triton, kernels.channel_pool_backward_triton)


OP = Op("channel_pool", reference=channel_pool_reference, ext=_ext_channel_pool, triton=_triton_channel_pool,
        differentiable=True)


def check_map(x, name: str) -> None:
    """Raise ValueError, naming ``name``, unless ``x`` is a floating [B, C, H, W] tensor with C, H, W > 0."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
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
    check_map(x, "x")
    if x.shape[0] == 0:
        return channel_pool_reference(x)
    return OP([x], x)


@register_fake("channel_pool")
def _channel_pool_shapes(x):
    batch, _, height, width = x.shape
    return x.new_empty((batch, 2, height, width)), x.new_empty((batch, height, width), dtype=torch.int32)


@register_fake("channel_pool_backward")
def _channel_pool_backward_shapes(grad, x, pooled, ties):
    return dense_like(x)
