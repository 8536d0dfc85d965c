"""dmgrd: GPU-accelerated reverse distillation with memory for industrial anomaly detection."""

from dmgrd import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
