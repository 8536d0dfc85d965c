"""Loading of dmgrd._C: version recording, fallback with one clear warning, and `dmgrd info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import dmgrd
import dmgrd.cli
from dmgrd import _extension


def test_installed_build_info_matches_loaded_state():
    status = _extension.status()
    if not _extension.BUILD_INFO.exists():  # a source checkout that was never built
        assert not status.loaded and "never built" in status.reason
        return
    info = json.loads(_extension.BUILD_INFO.read_text())
    assert status.loaded == (info["extension"] and info["torch"] == torch.__version__)
    if status.loaded:
        assert "dmgrd._C loaded" in status.describe()
        assert hasattr(torch.ops.dmgrd, "anomaly_map") and hasattr(torch.ops.dmgrd, "image_score")
    else:
        assert status.reason and status.reason in status.describe()


def test_every_schema_has_a_kernel_for_each_built_device():
    if not _extension.loaded():
        pytest.skip("dmgrd._C is not loaded")
    info = json.loads(_extension.BUILD_INFO.read_text())
    schemas = [s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("dmgrd::")]
    assert "dmgrd::fuse_pyramid_backward" in schemas and len(schemas) >= 13
    keys = ["CPU", "CUDA"] if info["with_cuda"] else ["CPU"]
    missing = [(name, key) for name in schemas for key in keys
               if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
    assert not missing, f"schemas without a kernel: {missing}"


def _status_with(monkeypatch, tmp_path, content: str | None):
    info = tmp_path / "_build_info.json"
    if content is not None:
        info.write_text(content)
    monkeypatch.setattr(_extension, "BUILD_INFO", info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = _extension._initial_status()
    return status, [str(w.message) for w in caught]


def test_mismatched_torch_version_falls_back_with_one_warning(monkeypatch, tmp_path):
    status, messages = _status_with(monkeypatch, tmp_path, json.dumps({"extension": True, "torch": "1.0.0"}))
    assert not status.loaded
    assert "built for torch 1.0.0" in status.reason and torch.__version__ in status.reason
    assert len(messages) == 1 and "falling back" in messages[0]


def test_missing_build_warns(monkeypatch, tmp_path):
    status, messages = _status_with(monkeypatch, tmp_path, None)
    assert not status.loaded and "never built" in status.reason
    assert len(messages) == 1


def test_pure_python_install_is_silent(monkeypatch, tmp_path):
    status, messages = _status_with(monkeypatch, tmp_path, json.dumps({"extension": False, "torch": None}))
    assert not status.loaded and "DMGRD_NO_EXT=1" in status.reason
    assert messages == []


def test_corrupt_build_info(monkeypatch, tmp_path):
    status, messages = _status_with(monkeypatch, tmp_path, "{not json")
    assert not status.loaded and "unreadable" in status.reason and len(messages) == 1


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dmgrd", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=os.path.dirname(__file__))


def test_info_reports_every_op_and_backend():
    result = _run_cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = [line.split(None, 3) for line in out.splitlines() if line.startswith("  anomaly_map") or
            line.startswith("  image_score")]
    assert {(op, backend, device) for op, backend, device, _ in rows} == {
        (op, b, d) for op in ("anomaly_map", "image_score") for b in ("ext", "triton", "torch") for d in ("cpu", "cuda")
    }
    ext_cpu = next(state for op, b, d, state in rows if (op, b, d) == ("anomaly_map", "ext", "cpu"))
    assert (ext_cpu == "available") == _extension.loaded()
    if not _extension.loaded():
        assert _extension.status().reason in out
    triton_cpu = next(state for op, b, d, state in rows if (op, b, d) == ("anomaly_map", "triton", "cpu"))
    assert triton_cpu == "available" or "TRITON_INTERPRET" in triton_cpu or "not installed" in triton_cpu


def test_info_honours_backend_variable():
    assert "backend requested: torch" in _run_cli("info", env={"DMGRD_BACKEND": "torch"}).stdout


def test_version():
    assert dmgrd.__version__
    with pytest.raises(SystemExit):
        dmgrd.cli.main(["nonsense"])
