"""``dmgrd.kernels`` in a source checkout.

An install maps the repository's top-level ``kernels/`` folder to the package ``dmgrd.kernels``
(``[tool.setuptools.package-dir]``). Imported straight from a checkout (``PYTHONPATH=.``), ``dmgrd`` has
no such subpackage; this registers ``kernels/`` under that name so both layouts import the same way.
"""

import importlib.util
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def alias_source_kernels() -> None:
    """Make ``import dmgrd.kernels`` find ``<checkout>/kernels`` when the package is not installed."""
    if "dmgrd.kernels" in sys.modules or importlib.util.find_spec("dmgrd.kernels") is not None:
        return
    init = KERNELS / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location("dmgrd.kernels", init, submodule_search_locations=[str(KERNELS)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["dmgrd.kernels"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["dmgrd"], "kernels", module)  # noqa: B010 (the package is still being initialised)


alias_source_kernels()
