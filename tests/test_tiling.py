"""Tiled inference (dmgrd.tiling): tiles cover every pixel of odd-sized images, the blend of overlapping tiles is
a weighted mean (a model whose map is its input gives back the image), one tile equals plain inference, and a
1000x700 image runs through a real exported model in batches of tiles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import dmgrd
from dmgrd.export import export_onnx
from dmgrd.tiling import blend_window, predict_tiled, tile_starts

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
SIZE = 64


def identity(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A "model" whose map is its input's first channel and whose score is that map's maximum."""
    maps = images[:, :1]
    return maps, maps.max(axis=(1, 2, 3))


@pytest.mark.parametrize("length, tile, stride", [(1000, 64, 32), (701, 64, 48), (65, 64, 64), (64, 64, 7),
                                                  (999, 100, 1)])
def test_tiles_cover_every_pixel(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    covered = np.zeros(length, int)
    for start in starts:
        covered[start:start + tile] += 1
    assert covered.min() >= 1 and starts[0] == 0 and starts[-1] == length - tile
    assert all(0 < b - a <= stride for a, b in itertools.pairwise(starts))


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="leaves pixels uncovered"):
        tile_starts(100, 32, 33)
    with pytest.raises(ValueError, match="larger than the image"):
        tile_starts(50, 64, 32)
    with pytest.raises(ValueError, match="batch_size"):
        predict_tiled(identity, np.zeros((64, 64), np.uint8), (SIZE, SIZE), batch_size=0)


def test_window_is_positive_and_peaks_in_the_middle():
    window = blend_window(64)
    assert window.min() > 0 and window.argmax() in (31, 32)
    np.testing.assert_allclose(window, window[::-1], atol=1e-7)


@pytest.mark.parametrize("shape, tile, stride", [((1000, 700), None, None), ((701, 333), (64, 64), (40, 21)),
                                                 ((129, 65), (64, 64), (64, 64))])
def test_blending_is_a_weighted_mean_of_the_tile_maps(shape, tile, stride):
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    calls = []

    def recorded(images):
        calls.append(len(images))
        return identity(images)

    blended, score = predict_tiled(recorded, image, (SIZE, SIZE), tile, stride, batch_size=8)
    assert blended.shape == shape and blended.dtype == np.float32
    np.testing.assert_allclose(blended, image, rtol=1e-5, atol=1e-6)  # every pixel's tiles agree on its value
    assert score == pytest.approx(float(image.max()))
    (th, tw), (sh, sw) = tile or (SIZE, SIZE), stride or (SIZE // 2, SIZE // 2)  # defaults: input size, half
    assert max(calls) <= 8 and sum(calls) == len(tile_starts(shape[0], th, sh)) * len(tile_starts(shape[1], tw, sw))


def test_tiles_of_another_size_are_resized_to_the_input_and_back():
    image = np.full((300, 200, 3), 77, np.uint8)
    blended, score = predict_tiled(identity, image, (SIZE, SIZE), tile=(96, 80), stride=(50, 40))
    assert blended.shape == (300, 200) and score == pytest.approx(77 / 255)
    np.testing.assert_allclose(blended, 77 / 255, rtol=1e-6)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    data = dmgrd.data.Synthetic(split="train", category="texture", image_size=SIZE, seed=0)
    model = dmgrd.RD4AD("efficientnet_lite0", weights=None, image_size=SIZE)
    model.fit(data, steps=1, batch_size=4, progress=False)
    dmgrd.calibrate_thresholds(model, torch.utils.data.Subset(data, range(4)))
    path = tmp_path_factory.mktemp("tiling") / "model.onnx"
    export_onnx(model, path)
    return dmgrd.Inferencer(path)


def test_one_tile_equals_plain_inference(onnx_model):
    image = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    plain, tiled = onnx_model.predict(image), onnx_model.predict_tiled(image)
    assert tiled.score == plain.score and tiled.label == plain.label
    np.testing.assert_allclose(tiled.anomaly_map, plain.anomaly_map, rtol=1e-6)
    assert np.array_equal(tiled.mask, plain.mask)


def test_a_large_image_runs_in_batches_of_tiles(onnx_model):
    image = np.full((1000, 700, 3), 128, np.uint8)
    image[500:540, 300:330] = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    result = onnx_model.predict_tiled(image, stride=(48, 48), batch_size=16)
    assert result.anomaly_map.shape == result.mask.shape == (1000, 700) and np.isfinite(result.anomaly_map).all()
    tiles = [image[y:y + SIZE, x:x + SIZE] for y in tile_starts(1000, SIZE, 48) for x in tile_starts(700, SIZE, 48)]
    plain = onnx_model.predict_batch(tiles, batch_size=64)
    assert result.score == pytest.approx(max(r.score for r in plain), abs=1e-5)  # the largest tile score
    # far from other tiles' influence (only the first tile covers the corner) the map is that tile's
    np.testing.assert_allclose(result.anomaly_map[:48, :48], plain[0].anomaly_map[:48, :48], rtol=1e-5)
