"""The accuracy benchmark: a tiny grid on the built-in data through the command line, its reports, and a
killed-and-resumed grid giving the results of an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dmgrd import benchmarking
from dmgrd.layout import parse_size

TINY = ["--data", "synthetic:object", "--methods", "rd4ad", "--backbone", "test_efficientnet", "--weights", "none",
        "--image-size", "32x64", "--steps", "2", "--batch-size", "4", "--device", "cpu", "--in-process"]
TIMING = {"train_seconds", "train_cpu_seconds", "images_per_second", "peak_memory_mb"}


def run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dmgrd", "benchmark", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def without_timing(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in row.items() if k not in TIMING} for row in rows), key=lambda r: r["key"])


def test_a_grid_runs_resumably_to_the_results_of_an_uninterrupted_one(tmp_path):
    whole = tmp_path / "whole"
    done = run_cli(*TINY, "--seeds", "0,1,2", "--out", str(whole))
    _, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr[-2000:]
    expected = benchmarking.read_results(whole)
    assert len(expected) == 3 and {row["seed"] for row in expected} == {0, 1, 2}
    for name in ("results.csv", "summary.md", "metrics_synthetic-object.png", "curves_synthetic-object.png"):
        assert (whole / name).is_file(), name
    summary = (whole / "summary.md").read_text()
    assert "| synthetic-object | rd4ad | clean | 3 |" in summary and " ± " in summary

    killed = tmp_path / "killed"
    first = run_cli(*TINY, "--seeds", "0,1,2", "--out", str(killed))
    deadline = time.time() + 600
    while len(benchmarking.read_results(killed)) < 1 and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # the grid process dies mid-grid (its running cell with it)
    first.communicate()
    partial = benchmarking.read_results(killed)
    assert first.returncode == -signal.SIGKILL, "the grid finished before it could be killed"
    # what a killed grid leaves: some finished cells of the same grid, not all of them
    assert partial and {r["key"] for r in partial} < {r["key"] for r in expected}
    resumed = run_cli(*TINY, "--seeds", "0,1,2", "--out", str(killed))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-2000:]
    assert without_timing(benchmarking.read_results(killed)) == without_timing(expected)


def test_an_isolated_cell_reports_its_own_process_peak_memory(tmp_path):
    budget = benchmarking.Budget("test_efficientnet", None, 32, 2, 4, "cpu")
    (row,) = benchmarking.benchmark(["synthetic:texture"], ["patchcore"], tmp_path, [0], budget=budget, progress=False)
    assert row["key"] == "synthetic-texture/patchcore/clean/seed0" and 0 <= row["image_auroc"] <= 1
    assert row["peak_memory_mb"] > 100 and row["images_per_second"] > 0  # a fresh process: torch and the model
    assert row["train_cpu_seconds"] > 0 and row["train_seconds"] > 0
    assert (tmp_path / "curves" / "synthetic-texture_patchcore_clean_seed0.json").is_file()


def test_summary_is_the_mean_and_sample_std_over_seeds():
    rows = [{"data": "d", "method": "m", "variant": "v", **dict.fromkeys(benchmarking.METRICS, value),
             "train_seconds": 1.0, "images_per_second": 2.0, "peak_memory_mb": 3.0} for value in (0.8, 0.9, 1.0)]
    (entry,) = benchmarking.summarise(rows)
    assert entry["seeds"] == 3
    assert entry["image_auroc"] == pytest.approx(0.9) and entry["image_auroc_std"] == pytest.approx(0.1)
    assert entry["train_seconds_std"] == 0.0
    assert "0.9000 ± 0.1000" in benchmarking.markdown_table([entry])
    assert "| 1 | – | 2.0 | 3 |" in benchmarking.markdown_table([entry])  # rows without the CPU time: shown as –
    rows[0]["train_cpu_seconds"] = rows[1]["train_cpu_seconds"] = rows[2]["train_cpu_seconds"] = 4.0
    assert "| 1 | 4 | 2.0 | 3 |" in benchmarking.markdown_table(benchmarking.summarise(rows))


def test_variants_sizes_and_unknown_methods():
    assert benchmarking.parse_variant("no-msff:attention=softmax,memory_size=10,triplet_margin=0.5") == (
        "no-msff", {"attention": "softmax", "memory_size": 10, "triplet_margin": 0.5})
    with pytest.raises(ValueError, match="key=value"):
        benchmarking.parse_variant("bad:memory_size")
    assert benchmarking.parse_variant('lines:anomaly_shapes=["blobs","lines"],memory_map_levels=[],textures=a,b=1') == (
        "lines", {"anomaly_shapes": ["blobs", "lines"], "memory_map_levels": [], "textures": "a", "b": 1})
    assert benchmarking.parse_variant('x:note="a, b",opts={"k": [1, 2]}') == (
        "x", {"note": "a, b", "opts": {"k": [1, 2]}})
    with pytest.raises(ValueError, match="unbalanced"):
        benchmarking.parse_variant("bad:anomaly_shapes=[blobs,lines")
    with pytest.raises(ValueError, match="needs a name"):
        benchmarking.parse_variant(":memory_size=3")
    assert parse_size("640x256") == (640, 256) and parse_size("64") == 64
    for text in ("64x", "0x32", "big"):
        with pytest.raises(ValueError, match="image size"):
            parse_size(text)
    with pytest.raises(ValueError, match="unknown method"):
        benchmarking.grid(["synthetic:object"], ["nope"], [0])
    cells = benchmarking.grid(["synthetic:object", "/data/kolektorsdd/kolektor"], ["rd4ad", "patchcore"], [0, 1],
                              {"clean": {}, "official": {"preset": "official"}})
    assert len(cells) == 2 * 2 * 2 * 2 and len({c.key for c in cells}) == len(cells)
    assert cells[-1].key == "kolektor/patchcore/official/seed1"
    for variant, message in [({"preset": "light"}, "'v' does not fit rd4ad: preset must be one of"),
                             ({"memory_sise": 3}, "'v' does not fit dmgrd: unknown DMGRDConfig option.*memory_sise"),
                             ({"blend": "nope"}, "'v' does not fit dmgrd: blend must be one of")]:
        with pytest.raises(ValueError, match=message):
            benchmarking.grid(["synthetic:object"], ["dmgrd", "rd4ad"], [0], {"v": variant})
    assert len(benchmarking.grid(["synthetic:object"], ["dmgrd"], [0], {"v": {"preset": "light"}})) == 1
