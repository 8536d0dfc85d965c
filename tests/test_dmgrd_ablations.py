"""DM-GRD's ablation switches (``ablate``) and the normal memory's direct term in the map (``memory_map_levels``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_dmgrd_memory import tiny_dmgrd

import dmgrd
from dmgrd.models.fusion import MSFF, GuidedProjection
from dmgrd.ops.anomaly_map import anomaly_map_reference, gaussian_blur_reference

LITE0 = "efficientnet_lite0"


def test_without_normal_memory_the_student_ignores_the_bank(gen):
    model = tiny_dmgrd(ablate="normal_memory", memory_map_levels=()).eval()
    assert model.config.ablate == ("normal_memory",)
    assert not model.normal_memory.filled and model.abnormal_memory.filled
    images = torch.rand(2, 3, 64, 64, generator=gen)
    before = model(images).anomaly_map
    for item in model.normal_memory.items:  # whatever the bank holds, nothing changes
        item.normal_(generator=gen)
    model.normal_memory.indices.fill_(0)
    torch.testing.assert_close(model(images).anomaly_map, before, rtol=0, atol=0)
    full = tiny_dmgrd().eval()
    assert not torch.allclose(full(images).anomaly_map, before)


def test_without_abnormal_memory_the_separation_terms_are_zero(gen):
    model = tiny_dmgrd(ablate=["abnormal_memory"])
    assert model.normal_memory.filled and not model.abnormal_memory.filled
    losses = model.training_losses(torch.rand(4, 3, 64, 64, generator=gen), torch.Generator().manual_seed(1))
    assert float(losses["contrast"]) == 0 and float(losses["triplet"]) == 0
    expected = losses["kd"] + model.config.separation_weight * losses["ssot"]
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.fusion.parameters() if p.requires_grad)


def test_without_msff_a_1x1_projection_fuses_each_level(gen):
    model = tiny_dmgrd(ablate="msff").eval()
    assert isinstance(model.fusion, GuidedProjection) and isinstance(tiny_dmgrd().fusion, MSFF)
    feats = model.teacher(torch.rand(2, 3, 64, 64, generator=gen))
    _, guided = model.normal_memory.select(feats)
    fused = model.fusion(guided)
    for conv, x, y, f in zip(model.fusion.levels, guided, fused, feats, strict=True):
        assert y.shape == f.shape
        torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias))
    losses = model.train().training_losses(torch.rand(4, 3, 64, 64, generator=gen), torch.Generator().manual_seed(1))
    assert torch.isfinite(losses["loss"])


def test_the_light_preset_is_the_clean_preset_without_msff():
    light = dmgrd.DMGRDConfig.from_preset("light")
    assert light.ablate == ("msff",)
    assert {**light.to_dict(), "preset": "clean"} == dmgrd.DMGRDConfig.from_preset("clean", ablate="msff").to_dict()
    assert isinstance(dmgrd.DMGRD(LITE0, weights=None, image_size=64, preset="light").fusion, GuidedProjection)
    with pytest.raises(ValueError, match="preset must be one of"):
        dmgrd.RD4AD(LITE0, weights=None, image_size=64, preset="light")


@pytest.mark.parametrize(("options", "message"), [
    ({"ablate": "memory"}, "ablate must name"),
    ({"ablate": "normal_memory"}, "the clean preset's: pass memory_map_levels=()"),
    ({"ablate": "normal_memory", "memory_map_levels": (3,)}, "no normal memory"),
    ({"ablate": "normal_memory", "triplet": "memory"}, "no normal memory"),
    ({"memory_map_levels": (0,)}, "memory_map_levels"),
])
def test_bad_ablation_options(options, message):
    with pytest.raises(ValueError, match=message):
        dmgrd.DMGRD(LITE0, weights=None, image_size=64, **options)


def test_memory_map_adds_the_cosine_distance_to_the_nearest_normal_patch(gen):
    model = tiny_dmgrd(memory_map_levels=[3]).eval()
    assert model.config.memory_map_levels == (3,)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    got = model(images).anomaly_map
    teacher = model.teacher(images)
    student = model.student_features(teacher)

    def averaged(f):
        return F.avg_pool2d(f.double(), 3, stride=1, padding=1, count_include_pad=False)

    query = averaged(teacher[2])
    patches = F.normalize(averaged(model.normal_memory.items[2]), dim=1).permute(0, 2, 3, 1).flatten(0, 2)
    cosine = F.normalize(query, dim=1).permute(0, 2, 3, 1) @ patches.T  # [B, H, W, P]
    distance = 1 - cosine.amax(-1)  # the nearest (largest cosine) patch
    levels = [t.double() for t in teacher], [s.double() for s in student]
    plain = anomaly_map_reference(*levels, (64, 64), sigma=model.config.sigma)
    memory_term = F.interpolate(distance[:, None], size=(64, 64), mode="bilinear", align_corners=True)
    expected = plain + gaussian_blur_reference(memory_term, model.config.sigma)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert (got.double() > plain + 1e-3).any()  # the term is really there
    # a memory patch scores ~0 against itself: memory images' own map term vanishes
    query_self, nearest = model.normal_memory.nearest_unit_patches(model.normal_memory.items[2], 2)
    assert float((1 - F.cosine_similarity(query_self, nearest, dim=1)).abs().max()) < 1e-5


def test_line_shaped_pseudo_anomalies_train_and_survive_save_load(gen, tmp_path):
    model = tiny_dmgrd(anomaly_shapes=("blobs", "lines"))
    assert model.synthesizer is not None and model.synthesizer.shapes == ("blobs", "lines")
    images = torch.rand(4, 3, 64, 64, generator=gen)
    lines = tiny_dmgrd(anomaly_shapes="lines").training_losses(images, torch.Generator().manual_seed(1))
    blobs = tiny_dmgrd().training_losses(images, torch.Generator().manual_seed(1))
    assert torch.isfinite(lines["loss"]) and not torch.equal(lines["kd"], blobs["kd"])  # other inputs, other loss
    model.save(tmp_path / "lines.pt")
    assert dmgrd.load(tmp_path / "lines.pt").config.anomaly_shapes == ("blobs", "lines")
