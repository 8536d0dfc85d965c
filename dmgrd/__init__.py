"""dmgrd: GPU-accelerated reverse distillation with memory for industrial anomaly detection.

``model = dmgrd.DMGRD(...)``; ``model.fit(train_data)``; ``model.eval(); model(images)`` ->
:class:`Prediction`; ``dmgrd.evaluate(model, test_data)``; ``model.save(path)`` / ``dmgrd.load(path)``;
``dmgrd.Inferencer("model.onnx").predict("image.png")``.

The names below are imported when first used (PEP 562), so that ``import dmgrd.infer`` needs no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from dmgrd import _source_tree  # noqa: F401  (dmgrd.kernels in a checkout)
from dmgrd._version import __version__

if TYPE_CHECKING:
    from dmgrd import data, metrics, ops
    from dmgrd.benchmarking import benchmark
    from dmgrd.engine import calibrate_thresholds, evaluate, fit
    from dmgrd.infer import Inferencer, InferenceResult
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

_MODELS = ["DMGRD", "DRD", "RD4AD", "RDPP", "DMGRDConfig", "DRDConfig", "MemKD", "MemKDConfig", "PatchCore",
           "PatchCoreConfig", "Prediction", "RD4ADConfig", "RDPPConfig", "load"]
# Where each public name lives; submodules (dmgrd.data, dmgrd.ops, ...) import on first access as well.
_NAMES = {
    **dict.fromkeys(_MODELS, "dmgrd.models"),
    "benchmark": "dmgrd.benchmarking",
    **dict.fromkeys(["calibrate_thresholds", "evaluate", "fit"], "dmgrd.engine"),
    **dict.fromkeys(["InferenceResult", "Inferencer"], "dmgrd.infer"),
}

__all__ = [
    "DMGRD", "DRD", "RD4AD", "RDPP", "DMGRDConfig", "DRDConfig", "InferenceResult", "Inferencer", "MemKD",
    "MemKDConfig", "PatchCore", "PatchCoreConfig", "Prediction", "RD4ADConfig", "RDPPConfig", "__version__",
    "benchmark", "calibrate_thresholds", "data", "evaluate", "fit", "load", "metrics", "ops",
]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
