"""Image-level anomaly score from an anomaly map: the maximum, or the mean of the ``k`` largest pixels."""

import torch

from dmgrd.ops._dispatch import Op, extension_op, register_fake, triton_kernel

MODES = ("max", "topk_mean")


def image_score_reference(anomaly_map: torch.Tensor, mode: str = "max", k: int = 100) -> torch.Tensor:
    """Pure-torch definition of :func:`image_score` on a ``[B, H, W]`` map (no input checks)."""
    flat = anomaly_map.flatten(1)
    if mode == "max":
        return flat.amax(1)
    return flat.topk(k, dim=1).values.mean(1)


OP = Op("image_score", reference=image_score_reference, ext=extension_op("image_score"),
        triton=triton_kernel("image_score", "image_score_triton"))


def image_score(anomaly_map: torch.Tensor, mode: str = "max", k: int = 100) -> torch.Tensor:
    """Score ``[B]`` for a batch of anomaly maps ``[B, 1, H, W]`` or ``[B, H, W]``.

    Args:
        anomaly_map: the maps, any float dtype and layout.
        mode: ``"max"`` (RD4AD, RD++) or ``"topk_mean"`` (DM-GRD: mean of the ``k`` largest pixels).
        k: pixels averaged by ``"topk_mean"``; at most ``H * W``.

    Returns:
        one score per image, in the map's dtype. A map containing NaN scores NaN.
    """
    if not isinstance(anomaly_map, torch.Tensor):
        raise ValueError(f"anomaly_map must be a tensor, got {type(anomaly_map).__name__}")
    if anomaly_map.dim() == 4:
        if anomaly_map.shape[1] != 1:
            raise ValueError(f"anomaly_map must have one channel, got shape {tuple(anomaly_map.shape)}")
        anomaly_map = anomaly_map[:, 0]
    if anomaly_map.dim() != 3:
        raise ValueError(f"anomaly_map must be [B, 1, H, W] or [B, H, W], got shape {tuple(anomaly_map.shape)}")
    if not anomaly_map.is_floating_point():
        raise ValueError(f"anomaly_map must be floating point, got {anomaly_map.dtype}")
    if anomaly_map.shape[1] * anomaly_map.shape[2] == 0:
        raise ValueError(f"anomaly_map has no pixels: shape {tuple(anomaly_map.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pixels = anomaly_map.shape[1] * anomaly_map.shape[2]
    if mode == "topk_mean" and not 1 <= int(k) <= pixels:
        raise ValueError(f"k must be between 1 and the number of pixels ({pixels}), got {k}")
    if anomaly_map.shape[0] == 0:
        return anomaly_map.new_empty((0,))
    return OP([anomaly_map], anomaly_map, mode, int(k))


@register_fake("image_score")
def _image_score_shapes(anomaly_map, mode, k):
    return anomaly_map.new_empty((anomaly_map.shape[0],))
