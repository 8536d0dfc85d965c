"""Checkpoints written by earlier versions still load and predict the same.

``tests/data/dmgrd_f22a683.pt`` was saved by dmgrd at commit f22a683, before data-built state and thresholds
were model state and before ``map_reduce`` existed: a DM-GRD (timm's 82k-parameter ``test_efficientnet``
teacher, random weights, 32x32) fitted for 2 steps on the first 8 Synthetic texture images with seed 0, saved
with ``thresholds={"image": 0.5, "pixel": 0.25, "quantile": 0.999}``. ``dmgrd_f22a683_expected.pt`` holds
two of those images and that version's maps and scores for them (computed by the torch references).
"""

from __future__ import annotations

from pathlib import Path

import torch

import dmgrd

DATA = Path(__file__).with_name("data")


def test_a_checkpoint_of_commit_f22a683_loads_and_predicts_the_same(tmp_path):
    model = dmgrd.load(DATA / "dmgrd_f22a683.pt")
    expected = torch.load(DATA / "dmgrd_f22a683_expected.pt", weights_only=True)
    assert model.method == "dmgrd" and model.config.map_reduce == "sum" and model.config.size == (32, 32)
    assert model.thresholds == {"image": 0.5, "pixel": 0.25}  # from the file's "thresholds" entry
    assert model.score_range is None  # recorded since; a file without it loads with none
    assert model.normal_memory.filled and model.abnormal_memory.filled
    got = model(expected["images"])
    # float32 rounding of another summation order (that version ran the torch references; this one the C++ ops)
    torch.testing.assert_close(got.anomaly_map, expected["map"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.score, expected["score"], rtol=1e-4, atol=1e-5)
    model.save(tmp_path / "again.pt")  # and it saves in the current format
    again = dmgrd.load(tmp_path / "again.pt")
    assert again.thresholds == model.thresholds
    torch.testing.assert_close(again(expected["images"]).anomaly_map, got.anomaly_map, rtol=0, atol=0)
