"""ONNX export of every method and preset, from the Python API right after ``fit`` and from the CLI after
``load``: onnxruntime's maps and scores on the real bottle test images equal the model's, and every decision
of the thresholds stored in the checkpoint is the same. The suite runs with the C++ extension loaded and, in
CI's second half, without it (``DMGRD_NO_EXT=1``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import dmgrd
from dmgrd.cli import main
from dmgrd.export import export_onnx, onnx_to_openvino
from dmgrd.infer import pixels

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"
pytestmark = pytest.mark.skipif(not (BOTTLE / "bottle").is_dir(), reason="../shared/data/mvtec_ad/bottle not present")

SIZE = 64
LITE0 = "efficientnet_lite0"
OPTIONS = {
    "rd4ad": {},
    "rdpp": {"ssot_points": 32},
    "dmgrd": {"memory_size": 3, "texture_count": 4, "ssot_points": 32},
    "memkd": {"exemplars": 3, "memory_items": 16},
    "drd": {},
    "patchcore": {"coreset_ratio": 0.1},
}
# |onnxruntime - torch| on maps and scores, bottle test images at 64x64: at most 1.9e-6 over the 20 models
# of the five trained methods; PatchCore up to 1.7e-5 (its nearest-patch distances re-ranked exactly; before
# that a near-tied patch swapped at OMP_NUM_THREADS=1 gave 1.8e-4).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bottle():
    train = dmgrd.data.MVTecAD(BOTTLE, "bottle", "train", image_size=SIZE)
    test = dmgrd.data.MVTecAD(BOTTLE, "bottle", "test", image_size=SIZE)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    return torch.utils.data.Subset(train, range(8, len(train))), torch.utils.data.Subset(train, range(8)), images


@pytest.fixture(scope="module", params=[(m, p) for m in OPTIONS for p in dmgrd.models.METHODS[m].config_class.PRESETS],
                ids=lambda mp: f"{mp[0]}-{mp[1]}")
def trained(request, bottle, tmp_path_factory):
    """A model fitted for a few steps on bottle, and its checkpoint with decision thresholds."""
    method, preset = request.param
    train, validation, _ = bottle
    torch.manual_seed(0)
    model = dmgrd.models.METHODS[method](LITE0, weights=None, preset=preset, image_size=SIZE, **OPTIONS[method])
    model.fit(train, steps=1, batch_size=2, progress=False)
    thresholds = dmgrd.calibrate_thresholds(model, validation, batch_size=8)
    checkpoint = tmp_path_factory.mktemp(f"{method}-{preset}") / "model.pt"
    model.save(checkpoint)
    return model, checkpoint, thresholds


def run_onnx(path: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = [], []
    for batch in images.split(16):  # another batch size than the export's
        out = session.run(["anomaly_map", "score"], {"images": batch.numpy()})
        maps.append(out[0])
        scores.append(out[1])
    return np.concatenate(maps), np.concatenate(scores)


def assert_same_predictions(model, path: Path, images: torch.Tensor, thresholds: dict) -> None:
    expected = model(images)
    maps, scores = run_onnx(path, images)
    want_maps, want_scores = expected.anomaly_map.numpy(), expected.score.numpy()
    assert maps.shape == want_maps.shape and scores.shape == want_scores.shape
    assert np.abs(maps - want_maps).max() < TOLERANCE
    assert np.abs(scores - want_scores).max() < TOLERANCE
    assert_same_decisions(scores, want_scores, thresholds["image"])
    assert_same_decisions(maps, want_maps, thresholds["pixel"])


def assert_same_decisions(got: np.ndarray, want: np.ndarray, threshold: float) -> None:
    """Every decision ``value > threshold`` is the same, except where the model's value lies within TOLERANCE of
    the threshold (both sides may round either way there; MemKD on onnxruntime 1.19 flipped one pixel in 12288)."""
    clear = np.abs(want - threshold) > TOLERANCE
    assert clear.mean() > 0.95
    assert np.array_equal((got > threshold)[clear], (want > threshold)[clear])


@pytest.mark.parametrize("after", ["fit", "load"])
def test_onnx_equals_the_model_on_bottle(trained, bottle, tmp_path, after):
    model, checkpoint, thresholds = trained
    images = bottle[2]
    path = tmp_path / "model.onnx"
    if after == "fit":  # the notebook path: export the model in memory, its parameters still requiring grad
        requires_grad = [p.requires_grad for p in model.parameters()]
        assert any(requires_grad) == model.needs_training  # PatchCore trains nothing
        assert export_onnx(model, path) < TOLERANCE
        assert model.training is False and [p.requires_grad for p in model.parameters()] == requires_grad
    else:  # the command line: a checkpoint rebuilt by load
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(path)]) == 0
        model = dmgrd.load(checkpoint)
        assert model.thresholds == thresholds
    assert_same_predictions(model, path, images, thresholds)


@pytest.mark.parametrize("trained", [("rd4ad", "clean"), ("patchcore", "clean")], indirect=True,
                         ids=["rd4ad-clean", "patchcore-clean"])
def test_inferencer_decides_alike_for_every_format_on_bottle(trained, tmp_path):
    """dmgrd.Inferencer from the bottle test files: checkpoint, ONNX and OpenVINO IR (when installed) give the same
    labels and masks, and scores, normalised scores and maps within TOLERANCE."""
    model, checkpoint, thresholds = trained
    test = dmgrd.data.MVTecAD(BOTTLE, "bottle", "test", image_size=SIZE)
    images = [pixels(sample.image) for sample in test.samples]  # the files' pixels, decoded once
    formats = {"onnx": tmp_path / "model.onnx"}
    export_onnx(model, formats["onnx"])
    if importlib.util.find_spec("openvino") is not None:
        formats["openvino"] = onnx_to_openvino(formats["onnx"], tmp_path / "model.xml")
    want = dmgrd.Inferencer(checkpoint).predict_batch(images)
    assert {r.label for r in want} == {False, True}
    for kind, path in formats.items():
        inferencer = dmgrd.Inferencer(path)
        meta = inferencer.metadata
        assert (meta.image_threshold, meta.pixel_threshold) == (thresholds["image"], thresholds["pixel"])
        got = inferencer.predict_batch(images)
        assert [r.label for r in got] == [r.label for r in want], kind
        assert max(abs(a.score - b.score) for a, b in zip(got, want, strict=True)) < TOLERANCE, kind
        assert max(abs(a.normalized_score - b.normalized_score) for a, b in zip(got, want, strict=True)) < TOLERANCE
        assert max(np.abs(a.anomaly_map - b.anomaly_map).max() for a, b in zip(got, want, strict=True)) < TOLERANCE
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(got, want, strict=True)), kind
