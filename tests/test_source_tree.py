"""A source checkout (no install, ``PYTHONPATH=<checkout>``) imports like an installed package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_source_checkout_imports_the_triton_kernels_as_dmgrd_kernels(tmp_path):
    code = ("import dmgrd, dmgrd.kernels\nfrom dmgrd.kernels import memory_nearest\n"
            "print(dmgrd.__file__)\nprint(dmgrd.kernels.__file__)\nprint(memory_nearest.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    package, kernels, submodule = result.stdout.split()
    assert Path(package) == ROOT / "dmgrd" / "__init__.py"
    assert Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert submodule == "dmgrd.kernels.memory_nearest"
