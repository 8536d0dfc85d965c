"""dmgrd.synthesis: Perlin noise and masks, FDA amplitude mixing, blends, textures and the batched synthesiser."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmgrd
from dmgrd import synthesis as S
from dmgrd.data.textures import load_textures

DTD = Path("/work/shared/data/dtd/images")
needs_dtd = pytest.mark.skipif(not DTD.is_dir(), reason=f"DTD images not found at {DTD}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images_and_textures(gen: torch.Generator, batch: int = 4, size=(32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth-ish random images and textures in [0, 1] (random fields upsampled, so the spectra are not flat)."""
    coarse = torch.rand(2, batch, 3, size[0] // 4, size[1] // 4, generator=gen, dtype=torch.float64)
    fine = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
    return fine.unflatten(0, (2, batch)).unbind(0)


def draem_perlin(angles: torch.Tensor, shape: tuple[int, int], res: tuple[int, int]) -> torch.Tensor:
    """DRAEM ``rand_perlin_2d`` (tiled gradients, ``shape`` divisible by ``res``) given its lattice angles."""
    d = (shape[0] // res[0], shape[1] // res[1])
    rows = torch.arange(shape[0], dtype=torch.float64) * res[0] / shape[0] % 1
    cols = torch.arange(shape[1], dtype=torch.float64) * res[1] / shape[1] % 1
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=-1).double()

    def n(dy: int, dx: int) -> torch.Tensor:
        g = gradients[dy : dy + res[0], dx : dx + res[1]].repeat_interleave(d[0], 0).repeat_interleave(d[1], 1)
        return ((grid - torch.tensor([dy, dx], dtype=torch.float64)) * g).sum(-1)

    t = 6 * grid**5 - 15 * grid**4 + 10 * grid**3
    left, right = torch.lerp(n(0, 0), n(1, 0), t[..., 0]), torch.lerp(n(0, 1), n(1, 1), t[..., 0])
    return math.sqrt(2) * torch.lerp(left, right, t[..., 1])


# --- Perlin noise -------------------------------------------------------------------------------------


def test_perlin_noise_matches_draem_on_divisible_sizes():
    res = (4, 8)
    noise = S.perlin_noise(2, (32, 64), res, seeded(5))
    angles = 2 * math.pi * torch.rand(2, res[0] + 1, res[1] + 1, generator=seeded(5))
    for i in range(2):
        torch.testing.assert_close(noise[i].double(), draem_perlin(angles[i], (32, 64), res), atol=1e-5, rtol=0)


def test_perlin_noise_bounded_smooth_and_not_constant(gen):
    noise = S.perlin_noise(8, 64, (4, 4), gen)
    assert noise.shape == (8, 64, 64)
    assert noise.abs().max() <= 1.0 + 1e-5
    assert (noise.amax(dim=(1, 2)) - noise.amin(dim=(1, 2))).min() > 0.3  # over 50 seeds: 1.20-1.43
    steps = torch.cat([noise.diff(dim=1).abs().flatten(), noise.diff(dim=2).abs().flatten()])
    assert steps.max() < 0.25  # over 50 seeds: 0.151-0.181
    assert steps.mean() < 0.08  # over 50 seeds: 0.044-0.048 (uniform noise in [-1, 1]: 0.67)


def test_perlin_noise_non_divisible_size_is_zero_on_lattice_points(gen):
    # 36 rows on 24 cells and 50 columns on 20 cells: lattice points fall on every 3rd row and 5th column.
    noise = S.perlin_noise(3, (36, 50), (24, 20), gen)
    assert noise.shape == (3, 36, 50)
    assert noise[:, ::3, ::5].abs().max() < 1e-5  # over 50 seeds: exactly 0
    assert noise.abs().max() > 0.1  # over 50 seeds: 0.82-0.88
    assert noise.abs().max() <= 1.0 + 1e-5


def test_perlin_noise_per_sample_resolution(gen):
    noise = S.perlin_noise(2, 64, torch.tensor([[1, 1], [32, 32]]), gen)
    roughness = noise.diff(dim=2).abs().mean(dim=(1, 2))
    assert roughness[1] > 5 * roughness[0]  # over 50 seeds: 16x-51x


def test_perlin_noise_rejects_bad_resolution(gen):
    with pytest.raises(ValueError):
        S.perlin_noise(2, 32, torch.tensor([[4, 4], [4, 0]]), gen)
    with pytest.raises(ValueError):
        S.perlin_noise(2, 32, torch.ones(3, 2, dtype=torch.int64), gen)


# --- Perlin masks -------------------------------------------------------------------------------------


def test_perlin_mask_binary_and_area_statistics(gen):
    masks = S.perlin_mask(100, 64, gen)
    assert masks.shape == (100, 1, 64, 64)
    assert masks.dtype == torch.float32
    assert bool(((masks == 0) | (masks == 1)).all())
    area = masks.mean(dim=(1, 2, 3))
    assert 0.02 < area.mean() < 0.5  # over 50 seeds: 0.035-0.049
    assert (area > 0).sum() > 50  # over 50 seeds: 85-99
    assert area.max() < 0.8  # over 50 seeds: 0.10-0.44


def test_perlin_mask_threshold_controls_area(gen):
    state = gen.get_state()
    low = S.perlin_mask(20, 32, gen, threshold=0.2).mean()
    gen.set_state(state)
    high = S.perlin_mask(20, 32, gen, threshold=0.5).mean()
    assert low > high  # over 50 seeds: low - high 0.12-0.20


def test_rotate_maps_quarter_turn_is_rot90():
    maps = torch.rand(1, 1, 16, 16, generator=seeded(0))
    rotated = S.rotate_maps(maps, torch.tensor([90.0]))
    candidates = [torch.rot90(maps, k, dims=(-2, -1)) for k in (1, -1)]
    assert min((rotated - c).abs().max() for c in candidates) < 1e-5  # over 50 seeds of maps: at most 1.1e-6


def test_rotate_maps_rotates_in_pixel_space_on_non_square_maps():
    maps = torch.zeros(1, 1, 32, 64)
    maps[..., 8:24, 24:40] = 1  # a centred square stays the same square under a quarter turn
    rotated = S.rotate_maps(maps, torch.tensor([90.0]))
    torch.testing.assert_close(rotated, maps, atol=1e-5, rtol=0)


# --- Fourier mixing -----------------------------------------------------------------------------------


def centred_window(height: int, width: int, window: float = 0.1) -> torch.Tensor:
    """The FDA window on fftshift-ed spectra, built from its slice definition."""
    b = math.floor(window * min(height, width))
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[height // 2 - b : height // 2 + b + 1, width // 2 - b : width // 2 + b + 1] = True
    return mask


def shifted_amplitude(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x).abs(), dim=(-2, -1))


def test_fourier_mix_lam_zero_returns_image(gen):
    images, textures = images_and_textures(gen)
    mixed = S.fourier_mix(images.float(), textures.float(), 0.0)
    torch.testing.assert_close(mixed, images.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (40, 64), (33, 45)])
def test_fourier_mix_lam_one_takes_texture_amplitude_in_window(gen, size):
    images, textures = images_and_textures(gen, size=size)
    mixed = S.fourier_mix(images, textures, torch.ones(images.shape[0], dtype=torch.float64))
    inside = centred_window(*size)
    out_amp, img_amp, tex_amp = (shifted_amplitude(x) for x in (mixed, images, textures))
    torch.testing.assert_close(out_amp[..., inside], tex_amp[..., inside], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_amp[..., ~inside], img_amp[..., ~inside], atol=1e-9, rtol=1e-9)
    assert (img_amp[..., inside] - tex_amp[..., inside]).abs().max() > 1e-2  # 50 seeds x 3 sizes: 59-245


def test_fourier_mix_keeps_image_phase(gen):
    images, textures = images_and_textures(gen)
    lam = torch.rand(images.shape[0], generator=gen, dtype=torch.float64)
    out_spec, img_spec = torch.fft.fft2(S.fourier_mix(images, textures, lam)), torch.fft.fft2(images)
    significant = (out_spec.abs() > 1e-6) & (img_spec.abs() > 1e-6)
    unit = lambda z: z[significant] / z[significant].abs()  # noqa: E731
    torch.testing.assert_close(unit(out_spec), unit(img_spec), atol=1e-8, rtol=0)


def test_fourier_mix_moves_mean_colour_toward_texture(gen):
    images, textures = images_and_textures(gen)
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    means = [x.mean(dim=(-2, -1)) for x in (S.fourier_mix(images, textures, lam), images, textures)]
    out_mean, img_mean, tex_mean = means
    torch.testing.assert_close(out_mean, img_mean + lam[:, None] * (tex_mean - img_mean), atol=1e-9, rtol=0)


def test_fourier_mix_rejects_mismatched_shapes(gen):
    images, textures = images_and_textures(gen)
    with pytest.raises(ValueError):
        S.fourier_mix(images, textures[..., :16], 0.5)


# --- Blending -----------------------------------------------------------------------------------------


def blend_inputs(gen: torch.Generator, batch: int = 4):
    images = torch.rand(batch, 3, 16, 16, generator=gen)
    mixed = torch.rand(batch, 3, 16, 16, generator=gen) * 1.4 - 0.2  # FDA output is not clipped
    mask = (torch.rand(batch, 1, 16, 16, generator=gen) > 0.5).float()
    beta = torch.rand(batch, generator=gen) * 0.8
    return images, mixed, mask, beta


def test_blend_legacy_matches_official_formula(gen):
    images, mixed, mask, beta = blend_inputs(gen)
    out = S.blend(images, mixed, mask, beta, "dmgrd_legacy")
    b = beta.view(-1, 1, 1, 1)
    official = (1 - mask) * mixed + (1 - b) * mixed + b * mask * mixed  # SPEC §4.2, as written in the code
    torch.testing.assert_close(out, official, atol=1e-6, rtol=0)
    outside = (mask == 0).expand_as(out)
    torch.testing.assert_close(out[outside], (mixed * (2 - b)).expand_as(out)[outside], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[~outside], mixed[~outside], atol=1e-6, rtol=0)
    assert out.max() > 1  # brightening, no clipping; over 50 seeds: 1.75-2.40


def test_blend_draem_matches_formula_and_leaves_outside_unchanged(gen):
    images, mixed, mask, beta = blend_inputs(gen)
    out = S.blend(images, mixed, mask, beta, "draem")
    b = beta.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, ((1 - mask) * images + mask * ((1 - b) * mixed + b * images)).clamp(0, 1))
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], images[outside])
    assert out.min() >= 0 and out.max() <= 1


def test_blend_scalar_beta_and_unknown_mode(gen):
    images, mixed, mask, _ = blend_inputs(gen)
    vector = S.blend(images, mixed, mask, torch.full((4,), 0.3), "draem")
    torch.testing.assert_close(S.blend(images, mixed, mask, 0.3, "draem"), vector)
    with pytest.raises(ValueError, match="blend mode"):
        S.blend(images, mixed, mask, 0.3, "cutpaste")


# --- Textures -----------------------------------------------------------------------------------------


def test_procedural_textures_range_and_variety(gen):
    textures = S.procedural_textures(6, (32, 48), gen)
    assert textures.shape == (6, 3, 32, 48)
    assert textures.min() >= 0 and textures.max() <= 1
    assert textures.std(dim=(2, 3)).min() > 0.02  # every channel varies; over 50 seeds: 0.038-0.054
    assert (textures[1:] - textures[:1]).abs().mean(dim=(1, 2, 3)).min() > 0.01  # over 50 seeds: 0.082-0.26


def test_procedural_textures_timing():
    start = time.perf_counter()
    S.procedural_textures(16, 256, seeded(0))
    assert time.perf_counter() - start < 5.0  # about 1 s on a 2-core CPU


@needs_dtd
def test_load_textures_dtd():
    textures = load_textures(DTD, 32, limit=5)
    assert textures.shape == (5, 3, 32, 32)
    assert textures.dtype == torch.float32
    assert textures.min() >= 0 and textures.max() <= 1
    assert textures.std(dim=(1, 2, 3)).min() > 0.01
    picked = load_textures(DTD, (16, 24), limit=5, generator=seeded(1))
    assert picked.shape == (5, 3, 16, 24)
    assert torch.equal(picked, load_textures(DTD, (16, 24), limit=5, generator=seeded(1)))
    assert not torch.equal(picked, load_textures(DTD, (16, 24), limit=5, generator=seeded(2)))


def write_solid(path: Path, colour: tuple[int, int, int], size=(20, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_load_textures_recursive_sorted_and_resized(tmp_path):
    write_solid(tmp_path / "b" / "x.png", (0, 255, 0))
    write_solid(tmp_path / "a" / "y.bmp", (255, 0, 0))
    write_solid(tmp_path / "c.PNG", (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    textures = load_textures(tmp_path, (8, 12))
    assert textures.shape == (3, 3, 8, 12)
    colours = textures.mean(dim=(2, 3))
    torch.testing.assert_close(colours, torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
    torch.testing.assert_close(load_textures(tmp_path, 4, limit=2).mean(dim=(2, 3)), colours[:2])


def test_load_textures_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_textures(tmp_path / "nowhere", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images in texture folder .*empty"):
        load_textures(tmp_path / "empty", 32)


def test_load_textures_corrupt_image(tmp_path):
    write_solid(tmp_path / "good.png", (10, 20, 30))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    with pytest.raises(ValueError, match=r"broken.jpg"):
        load_textures(tmp_path, 32)


# --- AnomalySynthesizer -------------------------------------------------------------------------------


@pytest.fixture
def synthesizer() -> S.AnomalySynthesizer:
    return S.AnomalySynthesizer(S.procedural_textures(5, 16, seeded(3)))


@pytest.mark.parametrize("batch", [1, 8])
def test_synth_shapes_and_draem_outside_mask_unchanged(synthesizer, gen, batch):
    images = torch.rand(batch, 3, 32, 32, generator=gen)
    augmented, mask = synthesizer.synth(images, gen)
    assert augmented.shape == images.shape and mask.shape == (batch, 1, 32, 32)
    assert bool(((mask == 0) | (mask == 1)).all())
    outside = (mask == 0).expand_as(images)
    assert torch.equal(augmented[outside], images[outside])
    assert augmented.min() >= 0 and augmented.max() <= 1


def test_synth_changes_pixels_inside_masks(synthesizer):
    images = torch.rand(16, 3, 32, 32, generator=seeded(0))
    augmented, mask = synthesizer.synth(images, seeded(0))
    inside = (mask == 1).expand_as(images)
    assert inside.any()
    assert (augmented[inside] - images[inside]).abs().mean() > 1e-3  # over 50 image and synth seeds: 0.017-0.053


def test_synth_beta_one_keeps_images():
    synthesizer = S.AnomalySynthesizer(S.procedural_textures(3, 32, seeded(0)), beta_range=(1.0, 1.0))
    images = torch.rand(4, 3, 32, 32, generator=seeded(1))
    augmented, _ = synthesizer.synth(images, seeded(2))
    torch.testing.assert_close(augmented, images)


def test_synth_legacy_brightens_outside_mask(synthesizer):
    legacy = S.AnomalySynthesizer(synthesizer.textures, blend="dmgrd_legacy")
    images = torch.rand(8, 3, 32, 32, generator=seeded(0)) * 0.5
    augmented, mask = legacy.synth(images, seeded(4))
    outside = (mask == 0).expand_as(images)
    assert augmented[outside].mean() > 1.15 * images[outside].mean()  # over 50 seeds: 1.75x-2.49x


def test_synth_deterministic_and_global_rng_untouched(synthesizer):
    images = torch.rand(3, 3, 32, 32, generator=seeded(0))
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    first = synthesizer.synth(images, seeded(7))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    second = synthesizer.synth(images, seeded(7))
    other = synthesizer.synth(images, seeded(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], other[1])


def test_synth_resizes_textures_once_per_size(synthesizer):
    images = torch.rand(2, 3, 24, 40, generator=seeded(0))
    cached = synthesizer.textures_like(images)
    assert cached.shape == (5, 3, 24, 40)
    assert synthesizer.textures_like(images) is cached
    assert synthesizer.synth(images, seeded(1))[0].shape == images.shape


# --- thin polylines ------------------------------------------------------------------------------------


def test_rasterized_lines_are_capsules_of_their_width():
    # A segment of length L and width w covers about L * w + pi w^2 / 4 pixels (a capsule; pixel centres within
    # w / 2 of it); an inactive segment draws nothing; a bent polyline is the union of its segments.
    points = torch.tensor([[[100.0, 50.0], [100.0, 150.0], [300.0, 150.0]],  # horizontal, then down
                           [[50.0, 50.0], [117.3, 250.1], [0.0, 0.0]],  # slanted, second segment inactive
                           [[20.0, 300.5], [220.0, 300.5], [220.0, 300.5]]])  # 1 pixel wide, then zero length
    active = torch.tensor([[True, True], [True, False], [True, True]])
    radius = torch.tensor([2.0, 3.0, 0.5])
    masks = S.rasterize_polylines(points, active, radius, (400, 400))
    assert masks.shape == (3, 1, 400, 400) and set(masks.unique().tolist()) <= {0.0, 1.0}
    length = torch.tensor([math.hypot(67.3, 200.1), 200.0])
    area = length * 2 * radius[1:] + math.pi * radius[1:] ** 2
    measured = masks[1:].sum((1, 2, 3))
    assert ((measured - area).abs() / area).max() < 0.02  # measured: 0.3 % and 0.6 %
    assert masks[1, 0, 130:].sum() == 0 and masks[1, 0, :40].sum() == 0  # only the active segment
    assert masks[2, 0, :, 299].sum() == masks[2, 0, :, 301].sum() == 0 < masks[2, 0, :, 300].sum()  # 1 pixel wide
    pieces = [S.rasterize_polylines(points[:1, k:k + 2], active[:1, :1], radius[:1], (400, 400)) for k in (0, 1)]
    assert torch.equal(masks[:1], torch.maximum(*pieces))


def test_polyline_mask_small_and_scales_with_the_image(gen):
    seed = int(torch.randint(2**31, (1,), generator=gen))
    small = S.polyline_mask(32, (640, 256), torch.Generator().manual_seed(seed))
    large = S.polyline_mask(32, (1280, 512), torch.Generator().manual_seed(seed))
    fraction = small.mean((1, 2, 3))
    assert fraction.max() < 0.02  # a thin defect: over 50 seeds at most 0.44 % of a 640x256 image
    assert (fraction > 0).float().mean() > 0.5  # most lines are on the image (over 50 seeds: 32 of 32)
    # Twice the size: the same line, twice as long and twice as wide, so four times the pixels.
    ratio = large.sum() / small.sum().clamp_min(1)
    assert 3.6 < ratio < 4.4  # over 50 seeds: 3.97-4.04


def test_synth_lines_are_thin_scratches_and_blobs_are_unchanged(gen):
    textures = S.procedural_textures(4, (64, 48), seeded(0))
    images = torch.rand(16, 3, 64, 48, generator=gen)
    seed = int(torch.randint(2**31, (1,), generator=gen))
    blobs = S.AnomalySynthesizer(textures).synth(images, seeded(seed))
    named = S.AnomalySynthesizer(textures, shapes=("blobs",)).synth(images, seeded(seed))
    assert all(torch.equal(a, b) for a, b in zip(blobs, named, strict=True))  # the default draws nothing more
    augmented, mask = S.AnomalySynthesizer(textures, shapes=("lines",)).synth(images, seeded(seed))
    outside = (mask == 0).expand_as(images)
    assert torch.equal(augmented[outside], images[outside])
    assert mask.mean() < 0.02  # over 50 seeds: 0.4-0.6 % of a 64x48 image (blobs: about 25 %)
    inside = mask[:, 0] == 1
    assert (augmented - images).abs().mean(1)[inside].mean() > 0.05  # over 50 seeds: 0.16-0.25

    def thin_and_thick(masks: torch.Tensor) -> tuple[int, int]:
        """Masks a 3x3 erosion removes entirely (lines one pixel wide at this size) and masks it leaves."""
        eroded = -torch.nn.functional.max_pool2d(-masks, 3, stride=1, padding=1)
        area, left = masks.sum((1, 2, 3)), eroded.sum((1, 2, 3))
        return int(((area > 0) & (left == 0)).sum()), int((left > 0).sum())

    thin, thick = thin_and_thick(mask)
    # A one-pixel line that leaves the image between pixel centres can draw nothing: over 300 seeds, 0 empty
    # masks of 16 in 285 batches, 1 in 14, 2 in 1; never a thick one.
    assert thick == 0 and thin >= 13
    # Both shapes, each drawn with probability 1/2, in a batch of 64: a Perlin blob can be empty or thin at this
    # size, and a batch of 16 once gave 16 thin masks and no thick one (seed 56355797). Over 400 seeds of 64:
    # 34-56 thin, 6-27 thick.
    mixed = torch.rand(64, 3, 64, 48, generator=gen)
    thin, thick = thin_and_thick(S.AnomalySynthesizer(textures, shapes=("blobs", "lines")).synth(mixed,
                                                                                                 seeded(seed))[1])
    assert thin >= 16 and thick >= 2


def test_line_shapes_need_the_draem_blend():
    with pytest.raises(ValueError, match="shapes"):
        S.AnomalySynthesizer(torch.rand(2, 3, 8, 8), shapes=("lines", "lines"))
    with pytest.raises(ValueError, match="shapes"):
        S.AnomalySynthesizer(torch.rand(2, 3, 8, 8), shapes=("cracks",))
    with pytest.raises(ValueError, match="draem"):
        S.AnomalySynthesizer(torch.rand(2, 3, 8, 8), blend="dmgrd_legacy", shapes=("lines",))
    with pytest.raises(ValueError, match="anomaly_shapes"):
        dmgrd.DMGRDConfig.from_preset("clean", anomaly_shapes=("blobs", "dots"))
    with pytest.raises(ValueError, match="draem"):
        dmgrd.DMGRDConfig.from_preset("official", anomaly_shapes=("lines",))
    assert dmgrd.DMGRDConfig.from_preset("clean", anomaly_shapes="lines").anomaly_shapes == ("lines",)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: S.perlin_noise(2, 24, (3, 5), g),
        lambda g: S.perlin_mask(4, 24, g),
        lambda g: S.procedural_textures(2, 16, g),
        lambda g: S.polyline_mask(4, (40, 24), g),
    ],
    ids=["perlin_noise", "perlin_mask", "procedural_textures", "polyline_mask"],
)
def test_functions_deterministic_and_global_rng_untouched(make):
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    first = make(seeded(11))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert torch.equal(first, make(seeded(11)))
    assert not torch.equal(first, make(seeded(12)))


def test_dmgrd_textures_come_from_a_folder_or_are_procedural(tmp_path):
    procedural = dmgrd.DMGRD("efficientnet_lite0", weights=None, image_size=32, memory_size=3, texture_count=3)
    textures = procedural._textures(seeded(0))
    assert textures.shape == (3, 3, 32, 32)
    torch.testing.assert_close(textures, S.procedural_textures(3, 32, seeded(0)), rtol=0, atol=0)
    colours = [(60 * i, 0, 0) for i in range(4)]
    for i, colour in enumerate(colours):
        write_solid(tmp_path / f"{i}.png", colour)
    folder = dmgrd.DMGRD("efficientnet_lite0", weights=None, image_size=32, memory_size=3, texture_count=2,
                         textures=str(tmp_path))
    textures = folder._textures(seeded(0))
    assert textures.shape == (2, 3, 32, 32)
    reds = sorted(round(float(r) * 255) for r in textures[:, 0].mean(dim=(1, 2)))
    assert set(reds) <= {c[0] for c in colours} and len(set(reds)) == 2


def test_synthesizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blend mode"):
        S.AnomalySynthesizer(torch.rand(2, 3, 8, 8), blend="additive")
    with pytest.raises(ValueError, match="textures"):
        S.AnomalySynthesizer(torch.rand(2, 1, 8, 8))


@needs_cuda
def test_synth_on_cuda_matches_cpu(synthesizer):
    images = torch.rand(4, 3, 64, 64, generator=seeded(0))
    cpu_out, cpu_mask = synthesizer.synth(images, seeded(5))
    gpu_out, gpu_mask = synthesizer.synth(images.cuda(), seeded(5))
    assert gpu_out.device.type == "cuda"
    differing = (gpu_mask.cpu() != cpu_mask).float().mean()
    assert differing < 1e-3  # thresholding may flip a pixel sitting on 0.5
    agree = (gpu_mask.cpu() == cpu_mask).expand_as(images)
    torch.testing.assert_close(gpu_out.cpu()[agree], cpu_out[agree], atol=1e-4, rtol=0)
