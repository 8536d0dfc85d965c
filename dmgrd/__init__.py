"""dmgrd: GPU-accelerated reverse distillation with memory for industrial anomaly detection.

``model = dmgrd.DMGRD(...)``; ``model.fit(train_data)``; ``model.eval(); model(images)`` ->
:class:`Prediction`; ``dmgrd.evaluate(model, test_data)``; ``model.save(path)`` / ``dmgrd.load(path)``.
"""

from dmgrd._source_tree import alias_source_kernels

alias_source_kernels()

from dmgrd import data, metrics, ops  # noqa: E402  (after the kernels alias)
from dmgrd.engine import calibrate_thresholds, evaluate, fit
from dmgrd.models import (
    DMGRD,
    DRD,
    RD4AD,
    RDPP,
    DMGRDConfig,
    DRDConfig,
    MemKD,
    MemKDConfig,
    Prediction,
    RD4ADConfig,
    RDPPConfig,
    load,
)

__version__ = "0.1.0"

__all__ = [
    "DMGRD",
    "DRD",
    "RD4AD",
    "RDPP",
    "DMGRDConfig",
    "DRDConfig",
    "MemKD",
    "MemKDConfig",
    "Prediction",
    "RD4ADConfig",
    "RDPPConfig",
    "__version__",
    "calibrate_thresholds",
    "data",
    "evaluate",
    "fit",
    "load",
    "metrics",
    "ops",
]
