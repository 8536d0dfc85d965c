"""PatchCore: locally aware patch features, the coreset memory bank, the nearest-patch map, the reweighted image
score against a brute-force computation, save/load, the command line, and learning on real bottle data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dmgrd
from dmgrd.cli import main
from dmgrd.ops.anomaly_map import gaussian_blur_reference

LITE0 = "efficientnet_lite0"
BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def synthetic(split: str, count: int, size: int = 64):
    data = dmgrd.data.Synthetic(split, "object", image_size=size, seed=0)
    return torch.utils.data.Subset(data, range(min(count, len(data))))


def fitted(count: int = 6, preset: str = "official", **options) -> dmgrd.PatchCore:
    torch.manual_seed(0)
    model = dmgrd.PatchCore(LITE0, weights=None, preset=preset, image_size=64, **options)
    model.fit(synthetic("train", count), batch_size=4, progress=False)
    return model


def test_config_checks():
    for options, message in [({"levels": (0, 2)}, "levels"), ({"neighbourhood": 2}, "odd"),
                             ({"coreset_ratio": 0.0}, "coreset_ratio"), ({"neighbours": 0}, "neighbours")]:
        with pytest.raises(ValueError, match=message):
            dmgrd.PatchCore(LITE0, weights=None, image_size=64, **options)


def test_patch_features_are_averaged_levels_on_the_finer_grid(gen):
    model = dmgrd.PatchCore(LITE0, weights=None, preset="official", image_size=64).eval()
    images = torch.rand(2, 3, 64, 64, generator=gen)
    feats = model.patch_features(images)
    _, c2, c3 = model.teacher.channels
    assert feats.shape == (2, c2 + c3, 8, 8)
    f2, f3 = model.teacher(images)[1:]
    expected2 = F.avg_pool2d(f2, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(feats[:, :c2], expected2)
    pooled3 = F.avg_pool2d(f3, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(feats[:, c2:], F.interpolate(pooled3, size=(8, 8), mode="bilinear"))


def test_clean_patch_features_are_the_unit_length_stride_16_level(gen):
    model = dmgrd.PatchCore(LITE0, weights=None, image_size=64).eval()
    assert model.config.levels == (3,) and model.config.normalize
    images = torch.rand(2, 3, 64, 64, generator=gen)
    feats = model.patch_features(images)
    pooled3 = F.avg_pool2d(model.teacher(images)[2], 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(feats, pooled3 / pooled3.norm(dim=1, keepdim=True))
    both = dmgrd.PatchCore(LITE0, weights=None, image_size=64, levels=(2, 3)).eval().patch_features(images)
    c2 = model.teacher.channels[1]
    # each level is scaled to unit length on its own grid (the coarser one before its upsampling)
    torch.testing.assert_close(both[:, :c2].norm(dim=1), torch.ones(2, 8, 8))
    assert (both[:, c2:].norm(dim=1) <= 1 + 1e-5).all() and both[:, c2:].norm(dim=1).min() > 0.5


def test_the_memory_is_a_coreset_of_the_training_patches():
    full = fitted(coreset_ratio=1.0)
    patches = 6 * 8 * 8
    assert full.memory.rows.shape == (patches, sum(full.teacher.channels[1:]))
    small = fitted(coreset_ratio=0.25, coreset_projection=None)
    assert small.memory.rows.shape[0] == round(0.25 * patches)
    # every kept row is one of the training patches
    distances = torch.cdist(small.memory.rows.double(), full.memory.rows.double()).amin(1)
    assert distances.max() < 1e-4
    assert fitted(count=6, coreset_ratio=1.0).training is False  # fit ends in eval mode


def test_training_images_score_zero_when_every_patch_is_kept():
    model = fitted(coreset_ratio=1.0)
    images = torch.stack([item["image"] for item in synthetic("train", 6)])
    prediction = model(images)
    assert prediction.anomaly_map.abs().max() < 1e-3  # each patch finds itself in memory
    assert prediction.score.abs().max() < 1e-3


def brute_force(model: dmgrd.PatchCore, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The map and image scores computed directly in float64 from the definition (module docstring)."""
    feats = model.patch_features(images).double()
    batch, dim, height, width = feats.shape
    rows = feats.permute(0, 2, 3, 1).reshape(batch, height * width, dim)
    memory = model.memory.rows.double()
    distances = torch.cdist(rows, memory[None].expand(batch, -1, -1))  # [B, P, M]
    nearest, index = distances.min(2)
    maps = F.interpolate(nearest.view(batch, 1, height, width), size=(64, 64), mode="bilinear")
    maps = gaussian_blur_reference(maps, model.config.sigma)
    scores = []
    for b in range(batch):
        p = int(nearest[b].argmax())
        anchor = memory[index[b, p]]
        support = torch.cdist(anchor[None], memory)[0].argsort()[: model.config.neighbours]
        d = torch.cdist(rows[b, p][None], memory[support])[0]
        scores.append((1 - torch.softmax(d, 0)[0]) * nearest[b, p])
    return maps, torch.stack(scores)


def test_map_and_reweighted_score_match_a_brute_force_computation(gen):
    model = fitted(coreset_ratio=0.5)
    images = torch.rand(3, 3, 64, 64, generator=gen)
    expected_maps, expected_scores = brute_force(model, images)
    got = model(images)
    torch.testing.assert_close(got.anomaly_map.double(), expected_maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.score.double(), expected_scores, rtol=1e-4, atol=1e-4)
    plain = fitted(coreset_ratio=0.5, neighbours=1)(images)
    torch.testing.assert_close(plain.score, got.anomaly_map.new_tensor(0) + plain.score)  # finite, no weights
    assert (got.score < plain.score).all()  # the weight 1 - softmax(d)_0 is below 1


def test_save_load_keeps_the_memory_and_the_predictions(tmp_path, gen):
    model = fitted(coreset_ratio=0.3)
    model.save(tmp_path / "patchcore.pt")
    loaded = dmgrd.load(tmp_path / "patchcore.pt")
    assert torch.equal(loaded.memory.rows, model.memory.rows)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    assert torch.equal(loaded(images).anomaly_map, model(images).anomaly_map)


def test_an_empty_memory_refuses_to_score():
    model = dmgrd.PatchCore(LITE0, weights=None, image_size=64).eval()
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        model(torch.rand(1, 3, 64, 64))


def test_cli_fits_and_tests_patchcore(tmp_path):
    common = ["--dataset", "synthetic", "--category", "object", "--device", "cpu", "--batch-size", "8"]
    out = tmp_path / "run"
    assert main(["train", *common, "--method", "patchcore", "--backbone", LITE0, "--weights", "none",
                 "--image-size", "64", "--steps", "1", "--out", str(out)]) == 0
    model = dmgrd.load(out / "model.pt")
    assert model.method == "patchcore" and model.memory.filled and model.thresholds is not None
    assert main(["test", *common, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "test"),
                 "--no-overlays"]) == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["image_auroc"] > 0.5


@pytest.mark.skipif(not (BOTTLE / "bottle").is_dir(), reason="../shared/data/mvtec_ad/bottle not present")
def test_patchcore_learns_on_real_bottle_data():
    train = dmgrd.data.MVTecAD(BOTTLE, "bottle", "train", image_size=64)
    test = dmgrd.data.MVTecAD(BOTTLE, "bottle", "test", image_size=64)
    model = dmgrd.PatchCore(LITE0, weights="imagenet", image_size=64, coreset_ratio=0.1, seed=0)
    model.fit(train, batch_size=32, progress=False)
    metrics = dmgrd.evaluate(model, test, batch_size=32, progress=False)
    assert np.isfinite(list(metrics.values())).all()
    # clean preset (stride-16 level: a 4x4 patch grid at 64x64), coreset seeds 0-2: image AUROC 0.9849, pixel AUROC
    # 0.7953 at every seed (112 channels need no random projection); the official preset: 0.9889-0.9913, 0.8103-0.8114
    assert metrics["image_auroc"] > 0.97 and metrics["pixel_auroc"] > 0.78, metrics
