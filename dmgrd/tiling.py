"""Tiled inference of images larger than a model's input, in numpy (no torch): overlapping tiles scored in
batches, their maps blended with a smooth window into one full-size map.

Memory stays bounded whatever the image size: the image stays in its own dtype (8-bit: 3 bytes a pixel), tiles
are cut, converted and scored ``batch_size`` at a time, and the only full-size float array is the map (plus one
row and one column of blending weights: the weights of a grid of tiles are separable).

The image score is the **largest score of any tile**, each tile scored by the method's own image score (top-k
mean, PatchCore's reweighting, DRD's refinement): a tile is an image at the training scale, so the model's
threshold applies to it, and an image covered by one tile gets exactly its plain score.
"""

from collections.abc import Callable, Iterator

import numpy as np

from dmgrd.imaging import model_input, resize
from dmgrd.sizes import size_pair

Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # [B, 3, H, W] -> maps [B, 1, H, W], scores [B]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles of ``tile`` pixels every ``stride`` along ``length``, the last one flush with the end
    (so tiles cover every pixel, whatever the remainder)."""
    if not 0 < stride <= tile:
        raise ValueError(f"the stride must be in [1, tile size {tile}] (a larger one leaves pixels uncovered), "
                         f"got {stride}")
    if tile > length:
        raise ValueError(f"the tile ({tile} px) is larger than the image ({length} px): predict the image "
                         f"without tiling (it is resized), or choose a smaller tile")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(length: int) -> np.ndarray:
    """1-D blending weights of a tile: a Hann window sampled at pixel centres, positive everywhere (an image
    border that only one tile covers keeps that tile's values), largest in the middle."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(length) + 0.5) / length)).astype(np.float32)


def _window_sum(length: int, tile: int, starts: list[int]) -> np.ndarray:
    total = np.zeros(length, np.float32)
    window = blend_window(tile)
    for start in starts:
        total[start:start + tile] += window
    return total


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_tiled(run: Run, image: np.ndarray, input_size: tuple[int, int], tile=None, stride=None,
                  batch_size: int = 8) -> tuple[np.ndarray, float]:
    """Blended anomaly map [H, W] (float32) and image score (the largest tile score) of the H x W (x C) pixel
    array ``image`` (any dtype :func:`dmgrd.imaging.rgb_float` takes) under a model ``run`` of ``input_size``.

    ``tile`` (H, W) or int, default ``input_size``: tiles of another size are resized to the input and their
    maps back. ``stride`` default half the tile (each pixel in up to four tiles); at most the tile.
    """
    tile = size_pair(tile if tile is not None else input_size, "tile")
    stride = size_pair(stride if stride is not None else (max(tile[0] // 2, 1), max(tile[1] // 2, 1)), "stride")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    height, width = image.shape[:2]
    rows, cols = tile_starts(height, tile[0], stride[0]), tile_starts(width, tile[1], stride[1])
    weights = blend_window(tile[0])[:, None] * blend_window(tile[1])[None, :]
    blended = np.zeros((height, width), np.float32)
    score = -np.inf
    for batch in _batches([(y, x) for y in rows for x in cols], batch_size):
        inputs = np.stack([model_input(image[y:y + tile[0], x:x + tile[1]], input_size) for y, x in batch])
        maps, scores = run(inputs)
        score = max(score, float(np.max(scores)))
        for (y, x), amap in zip(batch, maps[:, 0], strict=True):
            if amap.shape != tile:
                amap = resize(amap[..., None].astype(np.float32), tile)[..., 0]
            blended[y:y + tile[0], x:x + tile[1]] += weights * amap
    blended /= _window_sum(height, tile[0], rows)[:, None]
    blended /= _window_sum(width, tile[1], cols)[None, :]
    return blended, score
