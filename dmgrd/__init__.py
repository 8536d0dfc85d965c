"""dmgrd: GPU-accelerated reverse distillation with memory for industrial anomaly detection.

``model = dmgrd.DMGRD(...)``; ``model.fit(train_data)``; ``model.eval(); model(images)`` ->
:class:`Prediction`; ``dmgrd.evaluate(model, test_data)``; ``model.save(path)`` / ``dmgrd.load(path)``.
"""

from dmgrd import _source_tree, data, metrics, ops  # noqa: F401  (_source_tree: dmgrd.kernels in a checkout)
from dmgrd._version import __version__
from dmgrd.benchmarking import benchmark
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
    PatchCore,
    PatchCoreConfig,
    Prediction,
    RD4ADConfig,
    RDPPConfig,
    load,
)

__all__ = [
    "DMGRD", "DRD", "RD4AD", "RDPP", "DMGRDConfig", "DRDConfig", "MemKD", "MemKDConfig", "PatchCore", "PatchCoreConfig",
    "Prediction", "RD4ADConfig", "RDPPConfig", "__version__", "benchmark", "calibrate_thresholds", "data", "evaluate",
    "fit", "load", "metrics", "ops",
]
