"""RD++: simplex noise and patches, projections, the official and clean losses, training, save/load, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from noise.perlin import SimplexNoise

import dmgrd
from dmgrd import synthesis as S
from dmgrd.cli import main
from dmgrd.losses import contrast_loss, kd_loss
from dmgrd.models.projection import MultiProjection, ProjLayer

LITE0 = "efficientnet_lite0"
OCTAVE_AMPLITUDES = sum(0.6**o for o in range(6))  # bound of the fractal sum of noise in [-1, 1]


def make_rdpp(preset="clean", image_size=64, seed=0, **options):
    torch.manual_seed(seed)
    return dmgrd.RDPP(LITE0, weights=None, preset=preset, image_size=image_size, ssot_points=32, seed=seed,
                      **options)


def fitted_rdpp(preset="clean", steps=1, seed=0, **options):
    model = make_rdpp(preset, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed)
    data = [{"image": torch.rand(3, 64, 64, generator=gen)} for _ in range(4)]
    return model, model.fit(data, steps=steps, batch_size=2, progress=False)


def near_a_simplex_face(points: torch.Tensor, distance: float) -> torch.Tensor:
    """Points [..., 3] within ``distance`` of a face of the simplex grid (in skewed coordinates) but not on it:
    a cell face (an integer skewed coordinate) or a face between a cell's simplices (two equal fractions)."""
    skewed = points + points.sum(-1, keepdim=True) / 3
    frac = skewed - skewed.floor()
    gaps = torch.cat([frac, 1 - frac, (frac[..., [0, 1, 0]] - frac[..., [1, 2, 2]]).abs()], dim=-1)
    return ((gaps > 0) & (gaps < distance)).any(-1)


def reference_noise(table: list[int], x: float, y: float, z: float) -> float:
    """noise.perlin's pure-python simplex noise, summed over the RD++ octaves."""
    ref = SimplexNoise(permutation_table=table)
    return sum(0.6**o * ref.noise3(x * 2**o, y * 2**o, z * 2**o) for o in range(6))


# -- simplex noise --------------------------------------------------------------------------------------------

def test_simplex_noise3_matches_the_noise_package(gen):
    tables = S.simplex_permutations(2, gen)
    points = (torch.rand(2, 300, 3, generator=gen, dtype=torch.float64) - 0.5) * 50
    points[:, :20] = points[:, :20].round()  # lattice points and ties between coordinates
    points[0, 20:40, 1] = points[0, 20:40, 0]
    values = S.simplex_noise3(points, tables)
    for b in range(2):
        ref = SimplexNoise(permutation_table=tables[b].tolist())
        expected = torch.tensor([ref.noise3(*p) for p in points[b].tolist()], dtype=torch.float64)
        torch.testing.assert_close(values[b], expected, atol=1e-12, rtol=0)
    shared = S.simplex_noise3(points, tables[1])  # one [256] table for every batch item
    torch.testing.assert_close(shared[1], values[1], atol=0, rtol=0)
    assert not torch.allclose(shared[0], values[0])
    values32 = S.simplex_noise3(points.float(), tables)
    # Rounding to float32 can move a point lying within ~1e-6 of a simplex face (not on it) across the face, where
    # the reference kernel jumps: compare away from those. Points on a face (above) are exact in float32 too.
    away = ~near_a_simplex_face(points, 1e-4)
    assert away.float().mean() > 0.9  # over 50 seeds: 0.957-0.978 (the 20 tied points sit near a face: 0.967)
    torch.testing.assert_close(values32[away], values.float()[away], atol=1e-4, rtol=0)  # 50 seeds: at most 1.6e-5
    assert values.abs().max() <= 1


def test_simplex_patch_adds_scaled_noise_to_one_rectangle(gen):
    images = torch.rand(3, 3, 64, 80, generator=gen, dtype=torch.float64)  # float64: exact parity below
    tables = S.simplex_permutations(3, gen)
    state = gen.get_state()
    noisy, mask = S.simplex_patch(images, gen, tables)
    assert noisy.shape == images.shape and mask.shape == (3, 1, 64, 80)
    diff = noisy - images
    assert torch.all(diff[mask.expand_as(diff) == 0] == 0)
    assert diff.abs().max() <= 0.2 * OCTAVE_AMPLITUDES  # a bound, not a statistic: 50 seeds reach 0.51-0.77 of it
    for level in (0.0, 1.0):  # not clipped: black and white images get the same noise (of either sign)
        gen.set_state(state)
        saturated, _ = S.simplex_patch(torch.full_like(images, level), gen, tables)
        torch.testing.assert_close(saturated - level, diff, atol=1e-12, rtol=0)
    for b in range(3):
        rows, cols = mask[b, 0].any(1).nonzero()[:, 0], mask[b, 0].any(0).nonzero()[:, 0]
        top, left, height, width = int(rows[0]), int(cols[0]), len(rows), len(cols)
        assert mask[b, 0].sum() == height * width  # one filled rectangle
        assert 10 <= height <= 31 and 10 <= width <= 31
        assert top >= 1 and left >= 1 and top + height <= 63 and left + width <= 79
        # The noise is exactly 0 at the lattice points (channel, row, column) = (0, 0, 0), often (1, 1, 1) and (2, 2, 2)
        # too: 3 zeros make 0.99 in a 10 x 10 patch. Over 900 patches (300 seeds): at least 0.9917; floor 0.95.
        assert (diff[b, :, top:top + height, left:left + width] != 0).float().mean() > 0.95
        draws = (torch.randint(n, (20,), generator=gen).tolist() for n in (height, width, 3))
        for r, c, ch in zip(*draws, strict=True):
            expected = 0.2 * reference_noise(tables[b].tolist(), c / 32, r / 32, ch / 32)
            assert diff[b, ch, top + r, left + c].item() == pytest.approx(expected, abs=1e-12)


def test_simplex_patch_is_deterministic_given_the_generator():
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = S.simplex_patch(images, torch.Generator().manual_seed(7))
    second = S.simplex_patch(images, torch.Generator().manual_seed(7))
    other = S.simplex_patch(images, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].dtype == torch.float64
    # one shared table: every patch is a crop, from its corner, of the same noise field
    shared = S.simplex_permutations(1, torch.Generator().manual_seed(1))[0]
    noisy, mask = S.simplex_patch(images, torch.Generator().manual_seed(7), shared)
    crops = []
    for b in range(4):
        rows, cols = mask[b, 0].any(1).nonzero()[:, 0], mask[b, 0].any(0).nonzero()[:, 0]
        crops.append((noisy - images)[b, :, int(rows[0]):int(rows[0]) + 10, int(cols[0]):int(cols[0]) + 10])
    assert all(torch.allclose(crop, crops[0]) for crop in crops[1:])


def test_simplex_patch_rejects_sizes_that_do_not_fit():
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="size_range"):
        S.simplex_patch(images, torch.Generator(), size_range=(10, 31))
    with pytest.raises(ValueError, match="size_range"):
        S.simplex_patch(images, torch.Generator(), size_range=(12, 10))
    with pytest.raises(ValueError, match="permutation must be"):
        S.simplex_patch(images.expand(3, -1, -1, -1), torch.Generator(), torch.zeros(2, 256), (10, 30))
    _, mask = S.simplex_patch(images, torch.Generator(), size_range=(10, 30))
    assert 100 <= mask.sum() <= 900


# -- projections and the model ----------------------------------------------------------------------------

def test_projection_layers_and_wrn50_parameter_count(gen):
    projection = MultiProjection((256, 512, 1024))
    assert sum(p.numel() for p in projection.parameters()) / 1e6 == pytest.approx(15.5, abs=0.05)
    layer = projection.levels[0]
    convs = [m for m in layer if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (256, 128, (3, 3)), (128, 64, (3, 3)), (64, 128, (3, 3)), (128, 256, (3, 3))]
    norms = [m for m in layer if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 4 and not any(n.affine or n.track_running_stats for n in norms)
    assert isinstance(layer[-1], torch.nn.LeakyReLU) and layer[-1].negative_slope == 0.01
    small = ProjLayer(8)
    feats = torch.randn(3, 8, 5, 7, generator=gen)
    together = small(feats)
    assert together.shape == feats.shape
    torch.testing.assert_close(together[1:2], small(feats[1:2]))  # instance norm: samples are independent
    with pytest.raises(ValueError, match="at least 4 channels"):
        ProjLayer(3)


@pytest.mark.parametrize("size", [64, (64, 96)])
def test_shapes_through_every_module(size):
    model = dmgrd.RDPP(LITE0, weights=None, image_size=size).eval()
    height, width = model.config.size
    images = torch.rand(1, 3, height, width)
    teacher = model.teacher(images)
    expected = [(1, c, height // s, width // s) for c, s in zip(model.teacher.channels, (4, 8, 16), strict=True)]
    assert [tuple(f.shape) for f in model.projection(teacher)] == expected
    assert [tuple(s.shape) for s in model.student_features(teacher)] == expected
    prediction = model(images)
    assert prediction.anomaly_map.shape == (1, 1, height, width) and torch.isfinite(prediction.anomaly_map).all()
    assert torch.equal(prediction.score, prediction.anomaly_map.flatten(1).amax(1))  # image score: max


def test_official_preset_losses():
    model, history = fitted_rdpp("official", steps=2, contrast_margin=-1.0)  # margin -1: L_con never clamps
    assert all(abs(h["ssot"]) < 1e-6 for h in history)
    assert [h["lr"] for h in history] == [5e-3, 5e-3]  # constant, as the official code
    assert model.noise_permutation.shape == (256,)
    model.train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    losses = model.training_losses(images, torch.Generator().manual_seed(5))
    noisy, _ = S.simplex_patch(images, torch.Generator().manual_seed(5), model.noise_permutation, model.noise_sizes)
    clean_feats, noisy_feats = model.teacher(images), model.teacher(noisy)
    projected, projected_noisy = model.projection(clean_feats), model.projection(noisy_feats)
    torch.testing.assert_close(losses["contrast"], contrast_loss(noisy_feats, projected, -1.0))
    assert (losses["contrast"] - contrast_loss(projected_noisy, projected, -1.0)).abs() > 1e-3
    torch.testing.assert_close(losses["recon"], kd_loss(projected_noisy, projected, "pixel"))
    total = losses["kd"] + 0.2 * (losses["ssot"] + 0.01 * losses["recon"] + 0.1 * losses["contrast"]) / 1.11
    torch.testing.assert_close(losses["loss"], total)
    grads = torch.autograd.grad(losses["ssot"], list(model.projection.parameters()), allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) < 1e-8


def test_fixed_noise_field_needs_prepare():
    model = make_rdpp("official").train()
    with pytest.raises(RuntimeError, match="prepare"):
        model.training_losses(torch.rand(2, 3, 64, 64), torch.Generator())


def test_presets_differ_exactly_in_the_documented_behaviours():
    clean = dmgrd.RDPPConfig.from_preset("clean").to_dict()
    official = dmgrd.RDPPConfig.from_preset("official").to_dict()
    assert {k for k, v in clean.items() if official[k] != v} == {"preset", "ssot", "noise_field", "schedule"}
    assert clean["image_score"] == official["image_score"] == "max"
    with pytest.raises(ValueError, match="noise_field must be one of"):
        make_rdpp(noise_field="random")


def _grad_total(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_gradients_reach_projections_bottleneck_and_decoder():
    model = make_rdpp().train()
    losses = model.training_losses(torch.rand(3, 3, 64, 64), torch.Generator().manual_seed(3))
    assert losses["ssot"].requires_grad and losses["ssot"] > 0 and losses["recon"] > 0
    losses["loss"].backward()
    for level in model.projection.levels:
        assert all(conv.weight.grad.abs().sum() > 0 for conv in level if isinstance(conv, torch.nn.Conv2d))
    assert _grad_total(model.bottleneck) > 0 and _grad_total(model.decoder) > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_optimizer_groups_use_the_projection_lr():
    model = make_rdpp()
    distill, projection = model.optimizer_groups()
    assert distill["lr_scale"] == 1.0 and projection["lr_scale"] == pytest.approx(1e-3 / 5e-3)
    assert {id(p) for p in projection["params"]} == {id(p) for p in model.projection.parameters()}
    ids = [id(p) for p in distill["params"] + projection["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.trainable_parameters()}


def test_save_load_round_trip(tmp_path):
    model, _ = fitted_rdpp(steps=1)
    path = tmp_path / "rdpp.pt"
    model.save(path)
    loaded = dmgrd.load(path)
    assert isinstance(loaded, dmgrd.RDPP) and loaded.config == model.config and not loaded.training
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    assert torch.equal(model(images).anomaly_map, loaded(images).anomaly_map)


def test_cli_trains_rdpp_and_the_loss_goes_down(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--category", "texture", "--device", "cpu", "--batch-size", "4",
                 "--method", "rdpp", "--backbone", LITE0, "--weights", "none", "--image-size", "64", "--steps", "8",
                 "--checkpoint-every", "0", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["ssot"] == "sinkhorn"
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert len(rows) == 8 and {"kd", "ssot", "recon", "contrast", "projection"} <= set(rows[0])
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-2:]) < sum(losses[:2])  # over 20 --seed values: last two / first two 0.56-0.69
    model, extra = dmgrd.models.read_checkpoint(out / "model.pt")
    assert isinstance(model, dmgrd.RDPP) and extra["train_state"]["step"] == 8


def bottle_root() -> Path:
    """shared/data/mvtec_ad beside the checkout (or inside it), e.g. /work/shared for /work/main."""
    checkout = Path(__file__).resolve().parents[1]
    roots = [base / "shared" / "data" / "mvtec_ad" for base in (checkout.parent, checkout, Path("/work"))]
    return next((root for root in roots if (root / "bottle").is_dir()), roots[0])


@pytest.mark.skipif(not (bottle_root() / "bottle").is_dir(), reason="shared/data/mvtec_ad/bottle not present")
def test_rdpp_learns_on_real_bottle_data():
    train = dmgrd.data.MVTecAD(bottle_root(), "bottle", "train", image_size=64)
    test = dmgrd.data.MVTecAD(bottle_root(), "bottle", "test", image_size=64)
    torch.manual_seed(0)
    model = dmgrd.RDPP(LITE0, weights="imagenet", image_size=64, ssot_points=64, seed=0)
    history = model.fit(train, steps=30, batch_size=8, progress=False)  # 15 steps: image AUROC 0.86-0.97, 20 seeds
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]  # over 20 seeds: last / first 0.331-0.347
    metrics = dmgrd.evaluate(model, test, batch_size=32, progress=False)
    # over 20 seeds (torch.manual_seed and seed=): image AUROC 0.940-0.983 (mean 0.970, sd 0.010), pixel 0.916-0.938
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.85, metrics
