"""Build of dmgrd's C++/CUDA extension ``dmgrd._C`` (metadata lives in pyproject.toml).

- C++ CPU kernels (OpenMP) are always built.
- CUDA kernels too when a toolkit is found (``$CUDA_HOME``, else ``/usr/local/cuda``) or ``DMGRD_FORCE_CUDA=1``;
  ``DMGRD_NO_CUDA=1`` skips them (a faster build on machines without a GPU).
- ``DMGRD_NO_EXT=1`` installs pure Python.
- ``TORCH_CUDA_ARCH_LIST`` picks GPU architectures; without it and without a visible GPU: 8.0 and 9.0+PTX.
The torch version the extension was built against goes into ``dmgrd/_build_info.json``; at import, dmgrd
loads the extension only under that same torch.
"""

import glob
import json
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0+PTX"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """A CUDA toolkit with nvcc: $CUDA_HOME, else /usr/local/cuda (a bare `nvcc` on PATH may be a wrapper)."""
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def extension_plan():
    """(ext_modules, cmdclass extras, build info) for this environment."""
    if env_flag("DMGRD_NO_EXT"):
        return [], {}, {"extension": False, "torch": torch_version()}
    cuda_home = None if env_flag("DMGRD_NO_CUDA") else find_cuda_home()
    with_cuda = cuda_home is not None or env_flag("DMGRD_FORCE_CUDA")
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    cxx_flags = ["-O3", "-fopenmp"]
    kwargs = {"extra_link_args": ["-fopenmp"]}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        extension = cpp_extension.CUDAExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}
        kwargs["define_macros"] = [("WITH_CUDA", None)]
    else:
        extension = cpp_extension.CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
    ext = extension("dmgrd._C", sources, include_dirs=[str(ROOT / "csrc")], **kwargs)
    info = {
        "extension": True,
        "torch": torch.__version__,
        "with_cuda": with_cuda,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
    }
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}, info


EXT_MODULES, CMDCLASS, BUILD_INFO = extension_plan()


class BuildPyWithInfo(build_py):
    """Also writes ``dmgrd/_build_info.json`` (what the extension was built for) into the build."""

    def run(self):
        super().run()
        package_dir = ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib)
        target = package_dir / "dmgrd" / "_build_info.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(BUILD_INFO, indent=1))


setup(ext_modules=EXT_MODULES, cmdclass={"build_py": BuildPyWithInfo, **CMDCLASS})
