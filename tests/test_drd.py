"""DRD: MFCF, self cut-paste, the DRD losses, official vs clean training, the refined score, save/load, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import dmgrd
from dmgrd import ops
from dmgrd.cli import main
from dmgrd.losses import cos_chan, kd_loss, seg_l1
from dmgrd.models.bottleneck import MFCF
from dmgrd.models.teacher import split_batch
from dmgrd.synthesis import color_distance, self_cutpaste

LITE0 = "efficientnet_lite0"
SIZE = 32


def tiny_drd(preset="clean", seed=0, **options) -> dmgrd.DRD:
    torch.manual_seed(seed)
    return dmgrd.DRD(LITE0, weights=None, preset=preset, image_size=SIZE, seed=seed, **options)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def fitted():
    model = tiny_drd()
    data = [{"image": torch.rand(3, SIZE, SIZE, generator=seeded(i))} for i in range(4)]
    history = model.fit(data, steps=2, batch_size=2, progress=False)
    return model, history


# --- MFCF -------------------------------------------------------------------------------------------------


def test_mfcf_has_the_published_size_and_shapes():
    mfcf = MFCF((256, 512, 1024), "bottleneck", 3, 2)  # wide_resnet50_2's channels and decoder spec
    assert sum(p.numel() for p in mfcf.parameters()) / 1e6 == pytest.approx(90.3, abs=0.05)
    assert not any("conv4" in name or "bn4" in name for name, _ in mfcf.named_modules())
    feats = [torch.rand(1, 256, 8, 8), torch.rand(1, 512, 4, 4), torch.rand(1, 1024, 2, 2)]
    assert mfcf.eval()(feats).shape == (1, 2048, 1, 1)


@pytest.mark.parametrize("size", [32, (32, 64)])
def test_shapes_through_every_module(size):
    model = dmgrd.DRD(LITE0, weights=None, image_size=size).eval()
    assert isinstance(model.bottleneck, MFCF)
    height, width = model.config.size
    channels = model.teacher.channels
    images = torch.rand(2, 3, height, width)
    teacher = model.teacher(images)
    pyramid = [tuple(f.shape) for f in teacher]
    assert pyramid == [(2, c, height // s, width // s) for c, s in zip(channels, (4, 8, 16), strict=True)]
    code = model.bottleneck(teacher)
    assert code.shape == (2, 2 * channels[2], height // 32, width // 32)
    assert [tuple(s.shape) for s in model.decoder(code)] == pyramid
    prediction = model(images)
    assert (*prediction.anomaly_map.shape, *prediction.score.shape) == (2, 1, height, width, 2)
    assert torch.isfinite(prediction.score).all()


# --- self cut-paste and the masks ---------------------------------------------------------------------------


def find_source(images: torch.Tensor, patch: torch.Tensor) -> bool:
    """Whether ``patch`` [C, t, t] is a window of ``images`` [C, H, W] (brute force)."""
    side = patch.shape[-1]
    windows = images.unfold(1, side, 1).unfold(2, side, 1)  # C, H-t+1, W-t+1, t, t
    return bool(((windows - patch[:, None, None]).abs().amax((0, 3, 4)) < 1e-6).any())


def test_self_cutpaste_changes_only_the_pasted_square(gen):
    images = 0.7 + 0.3 * torch.rand(6, 3, SIZE, 48, generator=gen)
    augmented, mask = self_cutpaste(images, gen, per_sample=True)
    assert mask.shape == (6, 1, SIZE, 48) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(augmented * (1 - mask), images * (1 - mask))
    assert augmented.max() > 1  # patch + 0.2 * destination, not clipped
    for img, aug, m in zip(images, augmented, mask[:, 0], strict=True):
        rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        top, left, side = int(rows[0]), int(cols[0]), len(rows)
        assert len(cols) == side and m.sum() == side * side  # one square
        assert top >= 1 and top + side <= SIZE - 2 and left >= 1 and left + side <= 48 - 2
        window = (slice(None), slice(top, top + side), slice(left, left + side))
        assert find_source(img, aug[window] - 0.2 * img[window])


def test_self_cutpaste_is_deterministic_per_generator_and_draws_sizes_as_asked():
    images = torch.rand(16, 3, 64, 64, generator=seeded(0))
    first, first_mask = self_cutpaste(images, seeded(1))
    again, again_mask = self_cutpaste(images, seeded(1))
    other, _ = self_cutpaste(images, seeded(2))
    assert torch.equal(first, again) and torch.equal(first_mask, again_mask)
    assert not torch.equal(first, other)
    assert len(first_mask.sum((1, 2, 3)).unique()) == 1  # one side for the whole batch (official)
    areas = torch.cat([self_cutpaste(images, seeded(s), per_sample=True)[1].sum((1, 2, 3)) for s in range(2)])
    assert len(areas.unique()) > 3
    sides = areas.sqrt()
    assert sides.min() >= 2 and sides.max() <= 50  # U{10..200} rescaled from 256 to 64 pixels


def test_soft_mask_is_the_color_cosine_of_normalised_images(gen):
    model = tiny_drd()
    images = torch.rand(3, 3, SIZE, SIZE, generator=gen)
    augmented, mask = model.pseudo_anomalies(images, seeded(4))
    pasted = self_cutpaste(images, seeded(4), per_sample=True)[1]
    mean, std = model.teacher.mean, model.teacher.std
    expected = 1 - F.cosine_similarity((augmented - mean) / std, (images - mean) / std, dim=1)[:, None]
    torch.testing.assert_close(mask, expected, atol=1e-6, rtol=0)
    assert (mask * (1 - pasted)).abs().max() < 1e-6 and mask.max() > 0
    torch.testing.assert_close(color_distance(augmented, images, mean, std), mask)
    binary = tiny_drd(mask="binary_paste").pseudo_anomalies(images, seeded(4))[1]
    assert torch.equal(binary, pasted)


# --- losses ---------------------------------------------------------------------------------------------------


def test_cos_chan_matches_a_loop_and_the_flattened_option(gen):
    teacher = [torch.randn(3, 5, 4, 6, generator=gen), torch.randn(3, 7, 6, 4, generator=gen).transpose(2, 3)]
    student = [t + torch.randn(t.shape, generator=gen) for t in teacher]
    expected = 0.0
    for t, s in zip(teacher, student, strict=True):
        level = [1 - torch.dot(t[b, c].flatten(), s[b, c].flatten()) / (t[b, c].norm() * s[b, c].norm())
                 for b in range(t.shape[0]) for c in range(t.shape[1])]
        expected += torch.stack(level).mean()
    torch.testing.assert_close(cos_chan(teacher, student), expected, atol=1e-5, rtol=0)
    pairs = zip(teacher, student, strict=True)
    flat = sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1))).mean() for t, s in pairs)
    torch.testing.assert_close(cos_chan(teacher, student, "flatten"), flat)
    assert torch.equal(cos_chan(teacher, student, "flatten"), kd_loss(teacher, student, "flatten"))
    scaled = [t * torch.rand(3, 5, 1, 1, generator=gen) for t in teacher[:1]]  # a per-channel scale costs nothing
    assert cos_chan(teacher[:1], scaled).abs() < 1e-6 and kd_loss(teacher[:1], scaled, "pixel") > 1e-3
    with pytest.raises(ValueError, match="cos_chan mode"):
        cos_chan(teacher, student, "pixel")
    assert seg_l1(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)) == 1.0


# --- official vs clean training ---------------------------------------------------------------------------------


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same elements of the same storage (not merely equal values)."""
    return (a.untyped_storage().data_ptr(), a.storage_offset(), a.shape, a.stride()) == (
        b.untyped_storage().data_ptr(), b.storage_offset(), b.shape, b.stride())


def spy_training_step(model, monkeypatch, seed=3):
    """Losses of one step and what went in: teacher calls (inputs, outputs), bottleneck inputs, L_Seg map args."""
    seen = {"teacher": [], "bottleneck": [], "seg": None}
    model.teacher.register_forward_hook(lambda _, args, out: seen["teacher"].append((args[0], out)))
    model.bottleneck.register_forward_hook(lambda _, args, out: seen["bottleneck"].append(args[0]))
    original = ops.anomaly_map

    def spy(teacher, student, *args, **kwargs):
        seen["seg"] = (teacher, student, args, kwargs)
        return original(teacher, student, *args, **kwargs)

    monkeypatch.setattr(ops, "anomaly_map", spy)
    model.train()
    losses = model.training_losses(torch.rand(2, 3, SIZE, SIZE, generator=seeded(9)), seeded(seed))
    return losses, seen


@pytest.mark.parametrize("seg_target", ["noisy", "clean"])
def test_l_seg_compares_the_restoring_branch_with_the_specified_features(seg_target, monkeypatch):
    model = tiny_drd(seg_target=seg_target)
    _, seen = spy_training_step(model, monkeypatch)
    ((inputs, joint),) = seen["teacher"]  # one teacher pass over the clean and the cut-paste images
    images, augmented = inputs.chunk(2)
    clean, augmented_feats = split_batch(joint, images.shape[0])
    assert torch.equal(augmented, self_cutpaste(images, seeded(3), per_sample=True)[0])
    fed, restoring = seen["bottleneck"]
    assert all(map(same_view, fed, clean))  # the normal branch decodes the clean pyramid
    noise = torch.cat([(r - a).flatten() for r, a in zip(restoring, augmented_feats, strict=True)])
    # over 30 training-step seeds (5248 draws): std within 2.0% of 0.1, |mean| at most 0.0034
    assert noise.std().item() == pytest.approx(0.1, rel=0.1) and noise.mean().abs() < 0.02
    seg_teacher = seen["seg"][0]
    expected = restoring if seg_target == "noisy" else augmented_feats  # official: the in-place noise aliasing
    assert all(same_view(s, e) for s, e in zip(seg_teacher, expected, strict=True))
    assert seen["seg"][2:] == (((SIZE, SIZE),), {"reduce": "mean", "sigma": 0})


def test_presets_differ_exactly_in_the_documented_behaviours():
    clean = dmgrd.DRDConfig.from_preset("clean")
    official = dmgrd.DRDConfig.from_preset("official")
    differing = {k for k, v in clean.to_dict().items() if official.to_dict()[k] != v}
    assert differing == {"preset", "seg_target", "individual", "patch_draw", "schedule"}
    assert official.schedule == "constant"
    for config in (clean, official):
        assert (config.image_score, config.kd_reduction, config.mask) == ("drd_refined", "pixel", "soft")
    assert tiny_drd().optimizer_groups()[0]["weight_decay"] == 1e-5
    with pytest.raises(ValueError, match="seg_target must be one of"):
        tiny_drd(seg_target="aliased")
    with pytest.raises(TypeError, match="unknown DRDConfig option"):
        tiny_drd(noise=0.2)


def test_presets_give_different_losses_from_the_same_draws(monkeypatch):
    model = tiny_drd(individual="channel", patch_draw="batch")

    def losses(**options):
        model.config = dataclasses.replace(model.config, **options)
        return spy_training_step(model, monkeypatch)[0]

    official, clean = losses(seg_target="noisy"), losses(seg_target="clean")
    assert official["kd"] == clean["kd"] and official["rec"] == clean["rec"]  # same weights, same draws
    assert official["seg"] != clean["seg"]
    silent = [losses(seg_target=target, feature_noise=0.0)["seg"] for target in ("noisy", "clean")]
    assert silent[0] == silent[1]  # without noise the aliasing changes nothing
    flat = losses(individual="flatten", feature_noise=0.1)
    assert flat["kd"] != clean["kd"] and flat["rec"] != clean["rec"] and flat["seg"] == clean["seg"]


def test_gradients_reach_every_trainable_part(monkeypatch):
    model = tiny_drd()
    losses, _ = spy_training_step(model, monkeypatch)
    for name in ("seg", "loss"):
        model.zero_grad(set_to_none=True)
        losses[name].backward(retain_graph=True)
        parts = [*model.bottleneck.children(), *model.decoder.children()]
        assert len(parts) == 7
        for part in parts:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), (name, part)
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_a_short_fit_lowers_the_loss():
    model = tiny_drd(preset="official")
    data = [{"image": torch.rand(3, SIZE, SIZE, generator=seeded(i))} for i in range(4)]
    history = model.fit(data, steps=12, batch_size=4, progress=False)
    assert all(h["lr"] == 5e-3 for h in history)
    first = sum(h["loss"] for h in history[:3])
    last = sum(h["loss"] for h in history[-3:])
    assert last < 0.8 * first, [h["loss"] for h in history]  # over 20 model and data seeds: 0.585-0.659


# --- scoring, save/load, CLI ----------------------------------------------------------------------------------


def test_refined_score_equals_a_manual_computation(fitted):
    model, _ = fitted
    images = torch.rand(3, 3, SIZE, SIZE, generator=seeded(5))
    prediction = model(images)
    teacher = model.teacher(images)
    with torch.no_grad():
        student = model.student_features(teacher)
    torch.testing.assert_close(prediction.anomaly_map,
                               ops.anomaly_map_reference(teacher, student, (SIZE, SIZE), "sum", 4.0))
    levels = [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)]  # B x h x w
    for b in range(3):
        resized = [F.interpolate(a[b][None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=True)
                   for a in levels]
        variances = [float(torch.var(r)) for r in resized]
        chosen = variances.index(min(variances))
        blurred = ops.gaussian_blur_reference(sum(resized) / 3, 4.0)
        expected = (1 + levels[chosen][b].max()) * blurred.max()
        torch.testing.assert_close(prediction.score[b], expected, atol=1e-5, rtol=1e-5)
    model.config.image_score = "max"
    try:
        torch.testing.assert_close(model(images).score, prediction.anomaly_map.flatten(1).amax(1))
    finally:
        model.config.image_score = "drd_refined"


def test_save_load_round_trip(fitted, tmp_path):
    model, history = fitted
    assert set(history[0]) == {"loss", "kd", "rec", "seg", "lr"}
    path = tmp_path / "drd.pt"
    model.save(path)
    loaded = dmgrd.load(path)
    assert isinstance(loaded, dmgrd.DRD) and loaded.config == model.config and not loaded.training
    images = torch.rand(2, 3, SIZE, SIZE, generator=seeded(6))
    ours, theirs = model.eval()(images), loaded(images)
    assert torch.equal(ours.anomaly_map, theirs.anomaly_map) and torch.equal(ours.score, theirs.score)


def test_cli_trains_drd(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--category", "texture", "--device", "cpu", "--batch-size", "4",
                 "--method", "drd", "--preset", "official", "--backbone", LITE0, "--weights", "none",
                 "--image-size", str(SIZE), "--steps", "2", "--val-fraction", "0.02", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "drd" and config["model"]["seg_target"] == "noisy"
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert len(rows) == 2 and all(float(row["seg"]) > 0 and float(row["rec"]) > 0 for row in rows)
    model = dmgrd.load(out / "model.pt")
    assert isinstance(model, dmgrd.DRD) and model.config.preset == "official"
    assert torch.isfinite(model(torch.rand(1, 3, SIZE, SIZE)).score).all()


def test_onnx_export_keeps_the_refined_score(fitted, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from dmgrd.export import export_onnx

    model, _ = fitted
    assert export_onnx(model, tmp_path / "drd.onnx") < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "drd.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, SIZE, SIZE, generator=seeded(7))
    maps, scores = session.run(None, {"images": images.numpy()})
    expected = model.eval()(images)
    torch.testing.assert_close(torch.from_numpy(scores), expected.score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(maps), expected.anomaly_map, atol=1e-5, rtol=1e-5)
