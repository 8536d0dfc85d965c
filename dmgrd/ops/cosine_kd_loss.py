"""Reverse-distillation knowledge-distillation loss (SPEC §1.5), the training hot path of every method.

``L = Σ_l mean_rows (1 - cos(T_l[row], S_l[row]))`` where a row is one image's whole ``C·H·W`` vector
(``reduction="flatten"``, the official code) or one pixel's ``C`` channels (``"pixel"``, the RD4AD paper).
Cosines follow :func:`torch.nn.functional.cosine_similarity` (each norm clamped to ``eps = 1e-8``) and are
accumulated in float32 whatever the input dtype (float64 stays float64).

The fast paths are fused: the forward pass reads each feature once and keeps three gradient coefficients per
row, ``dL/dS = a·T + b_s·S`` and ``dL/dT = a·S + b_t·T``; the backward pass reads the features once more and
writes the gradients. :func:`cosine_kd_loss_reference` is the definition they are tested against.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dmgrd.layout import cosine_rows, dense_format
from dmgrd.numerics import accumulation_dtype, level_sum
from dmgrd.ops._dispatch import Op, register_fake
from dmgrd.ops.anomaly_map import check_feature_pairs

REDUCTIONS = ("flatten", "pixel")


def cosine_kd_loss_reference(
    teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor], reduction: str = "flatten"
) -> torch.Tensor:
    """Pure-torch definition of :func:`cosine_kd_loss` (differentiable, no input checks)."""
    def term(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(t.dtype)
        t, s = t.to(acc), s.to(acc)
        if reduction == "flatten":
            t, s = t.flatten(1), s.flatten(1)
        return (1 - F.cosine_similarity(t, s, dim=1)).mean()

    return level_sum(term(t, s) for t, s in zip(teacher_feats, student_feats, strict=True))


class _Kernels(NamedTuple):
    """A fast path's two halves. ``forward(teacher, student, reduction) -> (loss, coeffs [rows, 3])``;
    ``backward(grad, teacher, student, coeffs, reduction, teacher_grad) -> (student grads, teacher grads)``."""

    forward: Callable
    backward: Callable


class _CosineKDLoss(torch.autograd.Function):
    """Autograd of a fused fast path (the extension or Triton): gradients for the student and the teacher."""

    @staticmethod
    def forward(ctx, kernels: _Kernels, reduction: str, num_levels: int, *feats: torch.Tensor) -> torch.Tensor:
        loss, coeffs = kernels.forward(list(feats[:num_levels]), list(feats[num_levels:]), reduction)
        ctx.save_for_backward(coeffs, *feats)
        ctx.kernels, ctx.reduction, ctx.num_levels = kernels, reduction, num_levels
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        coeffs, *feats = ctx.saved_tensors
        n = ctx.num_levels
        teacher_grad = any(ctx.needs_input_grad[3 : 3 + n])
        grad_student, grad_teacher = ctx.kernels.backward(
            grad, feats[:n], feats[n:], coeffs, ctx.reduction, teacher_grad
        )
        student_grads = grad_student if any(ctx.needs_input_grad[3 + n :]) else [None] * n
        teacher_grads = grad_teacher if teacher_grad else [None] * n
        return (None, None, None, *teacher_grads, *student_grads)


def _ext_kernels() -> _Kernels:
    return _Kernels(torch.ops.dmgrd.cosine_kd_loss_forward, torch.ops.dmgrd.cosine_kd_loss_backward)


def _triton_kernels() -> _Kernels:
    from dmgrd.kernels.cosine_kd_loss import cosine_kd_loss_backward_triton, cosine_kd_loss_forward_triton

    return _Kernels(cosine_kd_loss_forward_triton, cosine_kd_loss_backward_triton)


def _fused(kernels: Callable[[], _Kernels]) -> Callable:
    def run(teacher: list[torch.Tensor], student: list[torch.Tensor], reduction: str) -> torch.Tensor:
        return _CosineKDLoss.apply(kernels(), reduction, len(teacher), *teacher, *student)

    return run


OP = Op(
    "cosine_kd_loss",
    reference=cosine_kd_loss_reference,
    ext=_fused(_ext_kernels),
    triton=_fused(_triton_kernels),
    triton_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    differentiable=True,
)


def cosine_kd_loss(
    teacher_feats: Sequence[torch.Tensor] | torch.Tensor,
    student_feats: Sequence[torch.Tensor] | torch.Tensor,
    reduction: str = "flatten",
) -> torch.Tensor:
    """``Σ_l mean (1 - cos)`` between teacher and student feature pyramids (SPEC §1.5).

    Args:
        teacher_feats: one ``[B, C_l, H_l, W_l]`` tensor per level (any float dtype, any memory layout).
        student_feats: the student's features, same shapes as ``teacher_feats``.
        reduction: ``"flatten"``: the cosine of each image's whole ``C·H·W`` vector, averaged over the batch;
            ``"pixel"``: the cosine over channels at each pixel, averaged over batch and pixels.

    Returns:
        a float32 scalar (float64 for float64 inputs), differentiable with respect to both feature lists.
        Mixed dtypes are promoted to a common one first. An empty batch gives NaN, the mean of nothing.
    """
    teacher, student = check_feature_pairs(teacher_feats, student_feats)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dtypes = {t.dtype for t in teacher}
    if len(dtypes) > 1:
        common = torch.float64 if torch.float64 in dtypes else torch.float32
        teacher, student = [t.to(common) for t in teacher], [s.to(common) for s in student]
    if teacher[0].shape[0] == 0:
        return cosine_kd_loss_reference(teacher, student, reduction)
    return OP(teacher + student, teacher, student, reduction)


def _empty_in_layout_of(x: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(student))


@register_fake("cosine_kd_loss_forward")
def _cosine_kd_loss_forward_shapes(teacher, student, reduction):
    dtype = accumulation_dtype(teacher[0].dtype)
    loss = teacher[0].new_empty((), dtype=dtype)
    return loss, teacher[0].new_empty((cosine_rows(teacher, reduction), 3), dtype=dtype)


@register_fake("cosine_kd_loss_backward")
def _cosine_kd_loss_backward_shapes(grad, teacher, student, coeffs, reduction, teacher_grad):
    grads_s = [_empty_in_layout_of(s, s) for s in student]
    grads_t = [_empty_in_layout_of(t, s) for t, s in zip(teacher, student, strict=True)] if teacher_grad else []
    return grads_s, grads_t
