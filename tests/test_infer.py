"""dmgrd.Inferencer: one prediction (score, map, normalised score, label, mask) from a checkpoint, an ONNX file
and an OpenVINO IR; the preprocessing stored in the file applied to paths, PIL images and numpy arrays; the ONNX
path without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmgrd
from dmgrd.data import read_image
from dmgrd.export import export_onnx, onnx_to_openvino
from dmgrd.metadata import METADATA_KEY, PREPROCESSING, InferenceMetadata

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
try:
    import openvino  # noqa: F401
    OPENVINO = True
except ImportError:
    OPENVINO = False
needs_openvino = pytest.mark.skipif(not OPENVINO, reason="openvino is not installed (pip install 'dmgrd[openvino]')")

SIZE = 64
TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny RD4AD with thresholds, saved as a checkpoint, ONNX and (when installed) OpenVINO IR."""
    out = tmp_path_factory.mktemp("infer")
    data = dmgrd.data.Synthetic(split="train", category="texture", image_size=SIZE, seed=0)
    torch.manual_seed(0)
    model = dmgrd.RD4AD("efficientnet_lite0", weights=None, image_size=SIZE)
    model.fit(torch.utils.data.Subset(data, range(8, 24)), steps=2, batch_size=4, progress=False)
    dmgrd.calibrate_thresholds(model, torch.utils.data.Subset(data, range(8)))
    model.save(out / "model.pt")
    export_onnx(model, out / "model.onnx")
    files = {"checkpoint": out / "model.pt", "onnx": out / "model.onnx"}
    if OPENVINO:
        files["openvino"] = onnx_to_openvino(out / "model.onnx", out / "model.xml")
    return model, files


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """PNG files of other sizes than the model's: RGB, grey, RGBA and 16-bit grey."""
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = {"rgb": rng.integers(0, 256, (90, 70, 3), dtype=np.uint8),
              "grey": rng.integers(0, 256, (40, 50), dtype=np.uint8),
              "rgba": rng.integers(0, 256, (64, 64, 4), dtype=np.uint8),
              "grey16": rng.integers(0, 65536, (80, 80), dtype=np.uint16)}
    paths = []
    for name, array in arrays.items():
        paths.append(out / f"{name}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def assert_same_results(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert abs(a.score - b.score) < TOLERANCE and abs(a.normalized_score - b.normalized_score) < TOLERANCE
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < TOLERANCE
        assert a.label == b.label
        assert np.array_equal(a.mask, b.mask)


def test_every_format_predicts_the_same(model_files, image_files):
    model, files = model_files
    results = {kind: dmgrd.Inferencer(path).predict_batch(image_files, batch_size=3) for kind, path in files.items()}
    reference = results.pop("checkpoint")
    for got in results.values():
        assert_same_results(got, reference)
    assert {r.label for r in reference} == {True}  # random pixels are far from the textures it learned
    first = reference[0]
    assert first.anomaly_map.shape == (SIZE, SIZE) and first.anomaly_map.dtype == np.float32
    assert first.mask.dtype == bool and 0 < first.mask.mean() < 1
    expected = model(torch.from_numpy(dmgrd.Inferencer(files["onnx"]).preprocess(image_files[0]))[None])
    assert first.score == pytest.approx(float(expected.score[0]), abs=1e-6)  # the checkpoint runs model(images)


def test_the_metadata_travels_in_the_exported_files(model_files):
    model, files = model_files
    low, high = model.score_range
    want = InferenceMetadata("rd4ad", (SIZE, SIZE), model.thresholds["image"], model.thresholds["pixel"], low, high)
    assert high == model.thresholds["image"] and low < high  # calibrate_thresholds: the validation scores' range
    for path in files.values():
        assert dmgrd.Inferencer(path).metadata == want, path
    props = {p.key: p.value for p in onnx.load(str(files["onnx"])).metadata_props}
    assert json.loads(props[METADATA_KEY])["preprocessing"] == PREPROCESSING


def test_score_range_is_saved_and_loaded(model_files, tmp_path):
    model, files = model_files
    loaded = dmgrd.load(files["checkpoint"])
    assert loaded.score_range == model.score_range and loaded.thresholds == model.thresholds
    loaded.set_thresholds(1.0, 2.0)
    assert loaded.score_range is None
    with pytest.raises(ValueError, match="must be \\(min, max\\)"):
        loaded.set_thresholds(1.0, 2.0, score_range=(3.0, 1.0))


def test_normalized_score_puts_the_threshold_at_one_half():
    meta = InferenceMetadata("rd4ad", (64, 64), image_threshold=3.0, pixel_threshold=1.0, score_min=1.0,
                             score_max=3.0)
    assert meta.normalized_score(3.0) == 0.5
    assert meta.normalized_score(1.0) == 0.0 and meta.normalized_score(0.0) == 0.0  # normal range -> [0, 0.5]
    assert meta.normalized_score(4.0) == 0.75 and meta.normalized_score(5.0) == 1.0 == meta.normalized_score(9.0)
    single = InferenceMetadata("rd4ad", (64, 64), 2.0, 1.0, 2.0, 2.0)  # one validation image: its own scale
    assert single.normalized_score(2.0) == 0.5 and single.normalized_score(3.0) == 0.75
    assert InferenceMetadata("rd4ad", (64, 64)).normalized_score(1.0) is None
    with pytest.raises(ValueError, match="score_min"):
        InferenceMetadata("rd4ad", (64, 64), 1.0, 1.0, 2.0, 1.0)


def test_labels_follow_the_normalised_score(model_files, image_files):
    _, files = model_files
    inferencer = dmgrd.Inferencer(files["onnx"])
    calm = np.full((64, 64, 3), 0.5, np.float32)
    for result in inferencer.predict_batch([*image_files, calm]):
        assert result.label == (result.normalized_score > 0.5)
        assert np.array_equal(result.mask, result.anomaly_map > inferencer.metadata.pixel_threshold)


def test_every_kind_of_input_is_preprocessed_alike(model_files, image_files):
    _, files = model_files
    inferencer = dmgrd.Inferencer(files["onnx"])
    rgb = np.asarray(Image.open(image_files[0]))
    want = inferencer.preprocess(image_files[0])
    assert want.shape == (3, SIZE, SIZE) and want.dtype == np.float32
    for same in (str(image_files[0]), Image.open(image_files[0]), rgb, rgb.astype(np.float32) / 255,
                 rgb.astype(np.uint16) * 257, np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], axis=2)):
        assert np.array_equal(inferencer.preprocess(same), want)
    grey = np.asarray(Image.open(image_files[1]))
    grey_input = inferencer.preprocess(grey)
    assert np.array_equal(inferencer.preprocess(grey[..., None]), grey_input)
    assert np.array_equal(inferencer.preprocess(np.repeat(grey[..., None], 3, axis=2)), grey_input)
    # the data sets' reader (torch's antialiased resize): the same input to float32 rounding
    for path in image_files:
        np.testing.assert_allclose(inferencer.preprocess(path), read_image(path, SIZE).numpy(), atol=1e-5)


def test_bad_inputs_get_clear_errors(model_files, tmp_path):
    _, files = model_files
    inferencer = dmgrd.Inferencer(files["onnx"])
    with pytest.raises(ValueError, match="channels last"):
        inferencer.predict(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        inferencer.predict(np.full((64, 64, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        inferencer.predict(np.full((64, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="integers or floats"):
        inferencer.predict(np.zeros((64, 64), bool))
    with pytest.raises(TypeError, match="file path, a PIL image or a numpy array"):
        inferencer.predict(torch.zeros(3, 64, 64))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        inferencer.predict(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"unknown model format '\.h5'"):
        dmgrd.Inferencer(tmp_path / "model.h5")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        dmgrd.Inferencer(tmp_path / "model.onnx")


def test_a_foreign_or_newer_onnx_file_is_refused(model_files, tmp_path):
    _, files = model_files
    graph = onnx.load(str(files["onnx"]))
    meta = json.loads(next(p.value for p in graph.metadata_props if p.key == METADATA_KEY))
    for name, edit, message in [("plain", None, "holds no dmgrd metadata"),
                                ("newer", {**meta, "version": 99}, "upgrade dmgrd"),
                                ("other", {**meta, "preprocessing": {"resize": "nearest"}}, "does not apply")]:
        del graph.metadata_props[:]
        if edit is not None:
            graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(edit))
        onnx.save(graph, str(tmp_path / f"{name}.onnx"))
        with pytest.raises(ValueError, match=message):
            dmgrd.Inferencer(tmp_path / f"{name}.onnx")


def test_a_missing_optional_runtime_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "model.xml").write_text("<net/>")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'dmgrd\[openvino\]'"):
        dmgrd.Inferencer(tmp_path / "model.xml")


BLOCK_TORCH = """
import sys
for name in ("torch", "torchvision", "triton", "timm"):
    sys.modules[name] = None  # `import torch` now raises ImportError, as where it is not installed
"""


def test_the_onnx_path_runs_without_torch(model_files, image_files):
    """In a fresh interpreter where torch cannot be imported: ``import dmgrd`` and dmgrd.infer work, the
    torch-backed names fail only when used, and the predictions equal the checkpoint's."""
    _, files = model_files
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        import numpy as np
        import dmgrd
        from dmgrd.infer import Inferencer
        results = Inferencer({str(files["onnx"])!r}).predict_batch({[str(p) for p in image_files]!r})
        tiled = Inferencer({str(files["onnx"])!r}).predict_tiled({str(image_files[0])!r})
        try:
            dmgrd.DMGRD
            lazy = "imported"
        except ImportError:
            lazy = "ImportError"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "triton", "timm")
                        and sys.modules[m] is not None)
        print(json.dumps({{"loaded": loaded, "lazy": lazy, "dir": "Inferencer" in dir(dmgrd),
                          "tiled": [tiled.score, float(tiled.anomaly_map.sum())],
                          "results": [[r.score, r.normalized_score, r.label, int(r.mask.sum()),
                                       r.anomaly_map.tolist()] for r in results]}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["loaded"] == [] and out["lazy"] == "ImportError" and out["dir"]
    want = dmgrd.Inferencer(files["checkpoint"])
    for (score, normalized, label, mask_sum, amap), ref in zip(out["results"], want.predict_batch(image_files),
                                                                 strict=True):
        assert abs(score - ref.score) < TOLERANCE and abs(normalized - ref.normalized_score) < TOLERANCE
        assert label == ref.label and mask_sum == int(ref.mask.sum())
        assert np.abs(np.asarray(amap, np.float32) - ref.anomaly_map).max() < TOLERANCE
    tiled = want.predict_tiled(image_files[0])
    assert out["tiled"][0] == pytest.approx(tiled.score, abs=TOLERANCE)
    assert out["tiled"][1] == pytest.approx(float(tiled.anomaly_map.sum()), rel=1e-5)
