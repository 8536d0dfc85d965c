"""Hot-path ops, each with a pure-torch reference and C++ / CUDA / Triton backends.

``dmgrd.ops.<op>`` picks the backend per call (see :mod:`dmgrd.ops._dispatch`); ``<op>_reference`` is
the pure-torch definition every fast path is tested against.
"""

from dmgrd.ops._dispatch import (
    BackendStatus,
    BackendUnavailableError,
    backends,
    op_table,
    requested_backend,
    use_backend,
)
from dmgrd.ops.anomaly_map import anomaly_map, anomaly_map_reference, gaussian_blur_reference, gaussian_weights
from dmgrd.ops.channel_pool import channel_pool, channel_pool_reference
from dmgrd.ops.coreset_update import coreset_update, coreset_update_reference, greedy_coreset
from dmgrd.ops.cosine_kd_loss import cosine_kd_loss, cosine_kd_loss_reference
from dmgrd.ops.dual_memory_margin import dual_memory_margin, dual_memory_margin_reference
from dmgrd.ops.fuse_pyramid import fuse_pyramid, fuse_pyramid_reference
from dmgrd.ops.image_score import image_score, image_score_reference
from dmgrd.ops.memory_nearest import memory_nearest, memory_nearest_reference
from dmgrd.ops.memory_readout import memory_readout, memory_readout_reference

__all__ = [
    "BackendStatus", "BackendUnavailableError", "anomaly_map", "anomaly_map_reference", "backends", "channel_pool",
    "channel_pool_reference", "coreset_update", "coreset_update_reference", "cosine_kd_loss",
    "cosine_kd_loss_reference", "dual_memory_margin", "dual_memory_margin_reference", "fuse_pyramid",
    "fuse_pyramid_reference", "gaussian_blur_reference", "gaussian_weights", "greedy_coreset", "image_score",
    "image_score_reference", "memory_nearest", "memory_nearest_reference", "memory_readout", "memory_readout_reference",
    "op_table", "requested_backend", "use_backend",
]
