"""Models: the frozen teacher, the reverse-distillation core and parts, and the methods built from them."""

from dmgrd.models.base import METHODS, AnomalyModel, Prediction
from dmgrd.models.config import ModelConfig
from dmgrd.models.dmgrd import DMGRD, DMGRDConfig
from dmgrd.models.drd import DRD, DRDConfig
from dmgrd.models.loading import load, read_checkpoint
from dmgrd.models.memkd import MemKD, MemKDConfig
from dmgrd.models.nr_memory import NRMemory
from dmgrd.models.patchcore import PatchCore, PatchCoreConfig
from dmgrd.models.rd4ad import RD4AD, RD4ADConfig
from dmgrd.models.rdpp import RDPP, RDPPConfig
from dmgrd.models.reverse_distillation import ReverseDistillation
from dmgrd.models.teacher import BACKBONES, Teacher, WeightsUnavailableError

__all__ = [
    "BACKBONES", "DMGRD", "DRD", "METHODS", "RD4AD", "RDPP", "AnomalyModel", "DMGRDConfig", "DRDConfig", "MemKD",
    "MemKDConfig", "ModelConfig", "NRMemory", "PatchCore", "PatchCoreConfig", "Prediction", "RD4ADConfig", "RDPPConfig",
    "ReverseDistillation", "Teacher", "WeightsUnavailableError", "load", "read_checkpoint",
]
