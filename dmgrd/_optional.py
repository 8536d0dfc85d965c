"""Optional dependencies, imported when first needed, with an error saying how to install them."""

import importlib
from types import ModuleType


def optional_module(name: str, install: str) -> ModuleType:
    """``import name``, or an ImportError that names the missing package and the ``install`` command."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{name} is not installed ({exc}): {install}") from None
