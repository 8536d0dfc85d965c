"""Loading of the compiled extension ``dmgrd._C``, with one clear warning and a fallback when it is unusable,
and how Triton runs here (compiled, or in its CPU interpreter).

The build writes ``_build_info.json`` beside the extension (torch version, CUDA kernels or not). The
extension is loaded only when that torch version equals the running one: a library compiled against
another torch can crash on load instead of failing cleanly.
"""

import importlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILD_INFO = Path(__file__).with_name("_build_info.json")
REINSTALL_HINT = "reinstall with `pip install --no-build-isolation .` in this environment"


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether ``dmgrd._C`` is loaded, what it was built with, and why not when it is not."""

    loaded: bool
    reason: str | None = None
    with_cuda: bool = False
    build_info: dict = field(default_factory=dict)

    def describe(self) -> str:
        if not self.loaded:
            return f"not loaded: {self.reason}"
        cuda = f"CPU + CUDA {self.build_info.get('cuda')} kernels" if self.with_cuda else "CPU kernels"
        return f"dmgrd._C loaded, built for torch {self.build_info.get('torch')}: {cuda}"


def _load() -> ExtensionStatus:
    if not BUILD_INFO.exists():
        return ExtensionStatus(False, f"dmgrd._C was never built (a source checkout?); {REINSTALL_HINT}")
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError) as exc:
        return ExtensionStatus(False, f"unreadable {BUILD_INFO.name} ({exc}); {REINSTALL_HINT}")
    if not info.get("extension"):
        return ExtensionStatus(False, "installed without the extension (DMGRD_NO_EXT=1)", build_info=info)
    if info.get("torch") != torch.__version__:
        return ExtensionStatus(
            False, f"dmgrd._C was built for torch {info.get('torch')} but torch {torch.__version__} is running; "
            f"{REINSTALL_HINT}", build_info=info)
    try:
        importlib.import_module("dmgrd._C")
    except (ImportError, OSError) as exc:
        return ExtensionStatus(False, f"dmgrd._C failed to load ({exc}); {REINSTALL_HINT}", build_info=info)
    return ExtensionStatus(True, None, bool(info.get("with_cuda")), info)


def _initial_status() -> ExtensionStatus:
    status = _load()
    if not status.loaded and status.build_info.get("extension", True):
        warnings.warn(f"dmgrd: C++/CUDA extension unusable, falling back to torch/Triton: {status.reason}",
                      RuntimeWarning, stacklevel=3)
    return status


_STATUS = _initial_status()


def status() -> ExtensionStatus:
    """The extension's load status (decided once, at import)."""
    return _STATUS


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def loaded() -> bool:
    """True when ``dmgrd._C`` is loaded and its ops are registered with the dispatcher."""
    return _STATUS.loaded
