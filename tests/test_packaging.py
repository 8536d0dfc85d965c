"""pyproject's lower bounds are the tested minimum versions of .ci/minimum-versions.txt (`make test-min`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
ROOT = Path(__file__).resolve().parents[1]


def lower_bounds(requirements: list[str]) -> dict[str, str]:
    bounds = {}
    for text in requirements:
        req = Requirement(text)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == ">=", f"{text!r}: one '>=' bound, the tested minimum"
        bounds[canonicalize_name(req.name)] = specs[0].version
    return bounds


def test_pyproject_lower_bounds_equal_the_minimum_versions_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bounds = lower_bounds(project["project"]["dependencies"])
    extras = dict(project["project"]["optional-dependencies"])
    lint = extras.pop("lint")  # exact pins, not ranges: a newer linter's rules must not fail `make lint`
    assert all(len(specs := list(Requirement(r).specifier)) == 1 and specs[0].operator == "==" for r in lint)
    for extra in extras.values():
        bounds.update(lower_bounds(extra))
    torch_build = [r for r in project["build-system"]["requires"] if Requirement(r).name == "torch"]
    assert lower_bounds(torch_build) == {"torch": bounds["torch"]}
    pins = {}
    for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s]+)", line).groups()
            pins[canonicalize_name(name)] = version
    assert pins == bounds


def test_every_source_package_is_installed():
    """A package folder missing from pyproject's list installs without it (the source tree still imports)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    folders = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "dmgrd").rglob("__init__.py")}
    assert folders <= listed and "dmgrd.kernels" in listed, sorted(folders - listed)
