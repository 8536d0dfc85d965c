"""Models: the frozen teacher, the reverse-distillation parts, and the methods built from them."""

from dmgrd.models.base import METHODS, AnomalyModel, ModelConfig, Prediction, load
from dmgrd.models.dmgrd import DMGRD, DMGRDConfig
from dmgrd.models.rd4ad import RD4AD, RD4ADConfig
from dmgrd.models.rdpp import RDPP, RDPPConfig
from dmgrd.models.teacher import BACKBONES, Teacher, WeightsUnavailableError

__all__ = [
    "BACKBONES",
    "DMGRD",
    "METHODS",
    "RD4AD",
    "RDPP",
    "AnomalyModel",
    "DMGRDConfig",
    "ModelConfig",
    "Prediction",
    "RD4ADConfig",
    "RDPPConfig",
    "Teacher",
    "WeightsUnavailableError",
    "load",
]
