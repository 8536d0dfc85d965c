"""The bad-input catalogue of docs/robustness.md: one test per row, each checking the documented behaviour."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import dmgrd
from dmgrd.data import Folder, MVTecAD, read_image, read_mask
from dmgrd.data.io import read_pair
from dmgrd.models import BACKBONES, WeightsUnavailableError
from dmgrd.models import weights as weights_module
from dmgrd.models.checkpoint import CHECKPOINT_VERSION

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KOLEKTOR = DATA / "kolektorsdd"
LITE0 = "efficientnet_lite0"
SIZE = 64


def _rgb(seed: int, height: int = 16, width: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **options)
    return path


def _box_mask(height: int = 16, width: int = 24) -> np.ndarray:
    """A {0, 255} mask with a box at rows 2..6, columns 14..20."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[2:7, 14:21] = 255
    return mask


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """[3, H, W] float32 tensor of an H x W (x 3) array already scaled to [0, 1]."""
    x = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return x.expand(3, -1, -1) if x.dim() == 2 else x.permute(2, 0, 1)


def _mvtec_tree(root: Path, test_folders: tuple[str, ...] = ("good", "crack"), masks: bool = True) -> Path:
    """``root/toy`` in the MVTec layout: one train image, one image per test folder, masks for the defects."""
    _save(root / "toy/train/good/000.png", _rgb(0))
    for index, folder in enumerate(test_folders):
        _save(root / f"toy/test/{folder}/000.png", _rgb(index + 1))
        if masks and folder != "good":
            _save(root / f"toy/ground_truth/{folder}/000_mask.png", _box_mask())
    return root


def _forward(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(images)
    return out.anomaly_map, out.score


@pytest.fixture(scope="module")
def rd4ad():
    torch.manual_seed(0)
    return dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _train_data(count: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(3, SIZE, SIZE, generator=gen)} for _ in range(count)]


@pytest.fixture(scope="module")
def dmgrd_run(tmp_path_factory):
    """A DM-GRD trained for one step and its training checkpoint."""
    path = tmp_path_factory.mktemp("dmgrd") / "dmgrd.pt"
    torch.manual_seed(0)
    model = dmgrd.DMGRD(LITE0, weights=None, image_size=SIZE, memory_size=3, texture_count=4, ssot_points=32)
    model.fit(_train_data(), steps=1, batch_size=2, progress=False, checkpoint=path)
    return model, path


@pytest.fixture(scope="module")
def rd4ad_checkpoint(tmp_path_factory, rd4ad):
    """An RD4AD saved with ``save()`` (no training state)."""
    path = tmp_path_factory.mktemp("rd4ad") / "rd4ad.pt"
    rd4ad.save(path)
    return path


# --- image files ---------------------------------------------------------------------------------------------------


def _encoded(tmp_path: Path, suffix: str) -> bytes:
    return _save(tmp_path / f"source{suffix}", _rgb(0, 64, 64), quality=90).read_bytes()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_zero_byte_image_is_named(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_named(tmp_path, suffix):
    data = _encoded(tmp_path, suffix)
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}: image file is truncated"):
        read_image(path)


def _flip(data: bytes, position: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize(("suffix", "where"), [
    (".png", lambda data: data.index(b"IDAT") + 40),  # compressed pixel data (zlib checks it)
    (".png", lambda data: 20),  # IHDR header (CRC-checked)
    (".jpg", lambda data: data.index(b"\xff\xc0") + 3),  # start-of-frame header
    (".jpg", lambda data: data.index(b"\xff\xc4") + 4),  # Huffman table
], ids=["png-pixels", "png-header", "jpeg-frame-header", "jpeg-huffman-table"])
def test_corrupt_image_is_named(tmp_path, suffix, where):
    data = _encoded(tmp_path, suffix)
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(_flip(data, where(data)))
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}"):
        read_image(path)


def test_text_file_named_png_is_named(tmp_path):
    path = tmp_path / "normal/notes.png"
    path.parent.mkdir()
    path.write_text("this is not an image\n")
    data = Folder(path.parent)  # listed by its suffix ...
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}: cannot identify image file"):
        data[0]  # ... and named when read


def test_non_image_files_are_ignored(tmp_path):
    images = [_save(tmp_path / "normal/000.png", _rgb(0)), _save(tmp_path / "normal/001.JPG", _rgb(1))]
    for name in ("notes.txt", "labels.csv", "Thumbs.db", "model.pt", "archive.zip"):
        (tmp_path / "normal" / name).write_bytes(b"\x00not an image")
    (tmp_path / "normal/subfolder.png").mkdir()
    data = Folder(tmp_path / "normal", image_size=8)
    assert [Path(item["path"]) for item in data] == images


def test_hidden_files_are_ignored(tmp_path):
    image = _save(tmp_path / "normal/000.png", _rgb(0))
    (tmp_path / "normal/._000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "normal/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "normal/.000.png.tmp").write_bytes(b"")
    assert [Path(item["path"]) for item in Folder(tmp_path / "normal", image_size=8)] == [image]


def _mode_cases() -> dict[str, tuple[Image.Image, np.ndarray, float]]:
    """Per colour mode: an image, the RGB [0, 1] values it must read as (computed here, not by Pillow), and the
    tolerance of that reference."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, 24), dtype=np.uint8)
    rgba = rng.integers(0, 256, (16, 24, 4), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (16, 24)).astype(np.uint16)
    bits = rng.random((16, 24)) > 0.5
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (16, 24), dtype=np.uint8)
    indexed = Image.fromarray(indices, "P")
    indexed.putpalette(palette.flatten().tolist())
    cmyk = rng.integers(0, 256, (16, 24, 4), dtype=np.uint8)
    ink = (255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:].astype(np.float64)) / 255
    gray_alpha = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(rgba[..., 3])])
    return {
        "gray-L": (Image.fromarray(gray), gray / 255, 1e-7),
        "bilevel-1": (Image.fromarray(bits), bits.astype(np.float64), 0.0),
        "gray-alpha-LA": (gray_alpha, gray / 255, 1e-7),
        "RGBA": (Image.fromarray(rgba, "RGBA"), rgba[..., :3] / 255, 1e-7),
        "palette-P": (indexed, palette[indices] / 255, 1e-7),
        "gray16-I;16": (Image.fromarray(gray16), gray16 / 65535, 1e-7),
        "CMYK": (Image.fromarray(cmyk, "CMYK"), np.round(ink) / 255, 1 / 255 + 1e-6),
    }


@pytest.mark.parametrize("mode", list(_mode_cases()))
def test_colour_mode_reads_as_rgb(tmp_path, mode):
    image, expected, tolerance = _mode_cases()[mode]
    path = tmp_path / ("image.tiff" if mode == "CMYK" else "image.png")
    image.save(path)
    assert Image.open(path).mode == image.mode  # the file really is in that mode
    x = read_image(path)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    assert torch.allclose(x, _as_tensor(expected), atol=tolerance, rtol=0)


@pytest.mark.skipif(not (KOLEKTOR / "kolektor").is_dir(), reason="../shared/data/kolektorsdd/kolektor not present")
def test_real_grayscale_tall_images_read_as_three_equal_channels():
    data = MVTecAD(KOLEKTOR, "kolektor", "test", image_size=(640, 256))
    index = next(i for i, sample in enumerate(data.samples) if sample.label == 1)
    item = data[index]
    gray = np.asarray(Image.open(data.samples[index].image), dtype=np.float32) / 255
    expected = F.interpolate(torch.from_numpy(gray)[None, None], size=(640, 256), mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp(0, 1)
    assert item["image"].shape == (3, 640, 256)
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])
    assert torch.allclose(item["image"][:1], expected, atol=1e-6)
    assert item["mask"].shape == (1, 640, 256) and item["mask"].sum() > 0


def test_exif_rotated_jpeg_reads_as_displayed_and_its_mask_stays_aligned(tmp_path):
    shown = np.zeros((16, 24, 3), dtype=np.uint8)  # as a viewer shows it: landscape, a white box at the top right
    shown[2:7, 14:21] = 255
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # the camera's pixels: portrait
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "bad/000.jpg"
    path.parent.mkdir()
    stored.save(path, exif=exif, quality=100)
    mask_path = _save(tmp_path / "masks/000_mask.png", _box_mask())  # drawn on the image as shown

    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")) / 255
    assert torch.allclose(read_image(path), _as_tensor(expected), atol=1e-7)
    _save(tmp_path / "normal/000.png", _rgb(0))
    item = Folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks", image_size=(16, 24))[1]
    image, mask = item["image"], item["mask"][0].bool()
    assert image.shape == (3, 16, 24) and mask.sum() == 35
    assert image[:, mask].min() > 0.8 and image[:, ~mask].max() < 0.2  # the mask covers the white box
    assert torch.equal(read_pair(path, mask_path)[1][0].bool(), mask)


def test_mask_size_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "image.png", _rgb(0))
    mask = _save(tmp_path / "mask.png", _box_mask(height=17))
    expected = f"mask {mask} is 24x17 (WxH) but its image {image} is 24x16"
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_pair(image, mask, size=8)


@pytest.mark.parametrize("colour", [False, True], ids=["gray", "colour"])
def test_non_binary_mask_is_binarised_by_the_rule(tmp_path, colour):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, 24), dtype=np.uint8)
    array = np.stack([gray, rng.integers(0, 256, (16, 24), dtype=np.uint8), gray], axis=2) if colour else gray
    path = _save(tmp_path / "mask.png", array)
    level = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255
    for rule, expected in ((">0.5", level > 0.5), (">0", level > 0), ("==1", level >= 1)):
        assert torch.equal(read_mask(path, rule=rule)[0], torch.from_numpy(expected).float()), rule
    resized = F.interpolate(torch.from_numpy(level).float()[None, None], size=(8, 12), mode="bilinear",
                            align_corners=False, antialias=True)[0]
    assert torch.equal(read_mask(path, size=(8, 12)), (resized > 0.5).float())  # resized, then thresholded


@pytest.mark.parametrize(("dtype", "value"), [(np.uint8, 1), (np.uint16, 1), (np.uint16, 255), (np.uint16, 65535)],
                         ids=["8bit-0-1", "16bit-0-1", "16bit-0-255", "16bit-0-65535"])
def test_label_masks_of_any_depth_read_as_binary(tmp_path, dtype, value):
    stored = (_box_mask() // 255).astype(dtype) * value
    path = _save(tmp_path / "mask.png", stored)
    assert torch.equal(read_mask(path)[0], torch.from_numpy(_box_mask() > 0).float())


def test_defect_image_without_mask_is_named(tmp_path):
    _mvtec_tree(tmp_path, masks=False)
    image = tmp_path / "toy/test/crack/000.png"
    expected = (f"ground-truth mask missing for {image}: expected {tmp_path / 'toy/ground_truth/crack/000'}"
                f"_mask.png or 000.png")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        MVTecAD(tmp_path, "toy", "test")


def test_empty_train_folder_is_named(tmp_path):
    (tmp_path / "toy/train/good").mkdir(parents=True)
    (tmp_path / "toy/train/good/readme.txt").write_text("images go here")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no images in {tmp_path / 'toy/train'}")):
        MVTecAD(tmp_path, "toy", "train")


@pytest.mark.parametrize("normal", ["missing", "empty", "misnamed"])
def test_test_split_without_good_images_is_named(tmp_path, normal):
    _mvtec_tree(tmp_path, test_folders=("crack",) if normal != "misnamed" else ("crack", "normal"))
    if normal == "empty":
        (tmp_path / "toy/test/good").mkdir()
    expected = f"no normal test images: expected them in {tmp_path / 'toy/test/good'} (class folders found: "
    with pytest.raises(FileNotFoundError, match=re.escape(expected) + ".*needs normal and defective test images"):
        MVTecAD(tmp_path, "toy", "test")
    assert len(MVTecAD(tmp_path, "toy", "train")) == 1  # the train split needs no such folder


def test_small_image_is_upsampled_bilinearly(tmp_path):
    array = _rgb(0, 16, 16)
    path = _save(tmp_path / "small.png", array)
    expected = F.interpolate(_as_tensor(array / 255)[None], size=(SIZE, SIZE), mode="bilinear",
                             align_corners=False)[0]
    assert torch.allclose(read_image(path, size=SIZE), expected, atol=1e-6)


def test_8000_pixel_image_is_resized(tmp_path):
    left, right = (200, 100, 50), (10, 240, 130)
    image = Image.new("RGB", (8000, 8000), left)
    image.paste(right, (4000, 0, 8000, 8000))
    path = tmp_path / "huge.png"
    image.save(path, compress_level=1)
    del image
    x = read_image(path, size=SIZE)
    assert x.shape == (3, SIZE, SIZE)
    assert torch.allclose(x[:, :, : SIZE // 2 - 1], torch.tensor(left).view(3, 1, 1) / 255, atol=1e-6)
    assert torch.allclose(x[:, :, SIZE // 2 + 1:], torch.tensor(right).view(3, 1, 1) / 255, atol=1e-6)


def test_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    path = _save(tmp_path / "large.png", _rgb(0, 16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses images over twice this many pixels
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}: .*MAX_IMAGE_PIXELS"):
        read_image(path)


# --- tensors into model(images) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_images_raise(rd4ad, images, value):
    bad = images.clone()
    bad[1, 2, 5, 7] = value
    with pytest.raises(ValueError, match="images contain NaN or infinite values"):
        rd4ad(bad)


def test_uint8_images_say_how_to_convert(rd4ad, images):
    with pytest.raises(ValueError, match=re.escape("got torch.uint8: convert them first, e.g. images.float() / 255")):
        rd4ad((images * 255).to(torch.uint8))


@pytest.mark.parametrize("scale", ["0-255", "imagenet-normalised"])
def test_images_outside_0_1_raise(rd4ad, images, scale):
    bad = images * 255 if scale == "0-255" else (images - 0.45) / 0.225
    with pytest.raises(ValueError, match=r"image values span \[.*\] but must lie in \[0, 1\]: divide 8-bit"):
        rd4ad(bad)


def test_float64_images_are_computed_in_the_model_dtype(rd4ad, images):
    maps, scores = _forward(rd4ad, images)
    maps64, scores64 = _forward(rd4ad, images.double())
    assert maps64.dtype == torch.float32 and scores64.dtype == torch.float32
    assert torch.equal(maps64, maps) and torch.equal(scores64, scores)  # float32 values: no difference at all
    noisy = images.double() + 1e-12  # not representable in float32: rounded to it first
    assert torch.equal(_forward(rd4ad, noisy)[0], _forward(rd4ad, noisy.float())[0])


def test_grayscale_batch_is_expanded_to_three_channels(rd4ad, images):
    gray = images[:, :1]
    maps, scores = _forward(rd4ad, gray)
    assert torch.equal(maps, _forward(rd4ad, gray.repeat(1, 3, 1, 1))[0])
    assert torch.equal(scores, _forward(rd4ad, gray.repeat(1, 3, 1, 1))[1])


@pytest.mark.parametrize(("shape", "shown"), [((2, 4, SIZE, SIZE), r"\(2, 4, 64, 64\)"),
                                              ((3, SIZE, SIZE), r"\(3, 64, 64\)")], ids=["rgba", "no-batch"])
def test_wrong_channel_count_or_rank_raises(rd4ad, shape, shown):
    with pytest.raises(ValueError, match=r"images must be a \[B, 3, H, W\] tensor .*got " + shown):
        rd4ad(torch.rand(shape))


def test_non_tensor_input_raises(rd4ad, images):
    with pytest.raises(ValueError, match=r"images must be a \[B, 3, H, W\] tensor .*got ndarray"):
        rd4ad(images.numpy())


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_memory_layout_does_not_change_the_result(rd4ad, images, layout):
    if layout == "channels_last":
        strange = images.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        strange = images.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        strange = images.repeat_interleave(2, dim=3)[..., ::2]
    assert not strange.is_contiguous() and torch.equal(strange, images)
    maps, scores = _forward(rd4ad, images)
    strange_maps, strange_scores = _forward(rd4ad, strange)
    assert torch.equal(strange_maps, maps) and torch.equal(strange_scores, scores)


@pytest.mark.parametrize("method", ["rd4ad", "dmgrd"])
def test_empty_batch_gives_an_empty_prediction(request, method):
    model = request.getfixturevalue("rd4ad") if method == "rd4ad" else request.getfixturevalue("dmgrd_run")[0]
    out = model(torch.rand(0, 3, SIZE, SIZE))
    assert out.anomaly_map.shape == (0, 1, SIZE, SIZE) and out.score.shape == (0,)
    assert out.anomaly_map.dtype == torch.float32 and out.score.dtype == torch.float32


def test_images_on_another_device_name_both(rd4ad, images):
    with pytest.raises(ValueError, match=re.escape("images are on meta but the model is on cpu: move them")):
        rd4ad(images.to("meta"))


@pytest.mark.parametrize("size", [48, (64, 80)], ids=["48", "64x80"])
def test_image_size_not_a_multiple_of_the_stride_raises(size):
    expected = f"image_size must be a multiple of 32 in both dimensions, got {size}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        dmgrd.RD4AD(LITE0, weights=None, image_size=size)


def test_images_of_another_size_raise(rd4ad):
    with pytest.raises(ValueError, match=re.escape("images are (32, 96) but the model expects image_size (64, 64)")):
        rd4ad(torch.rand(1, 3, 32, 96))


# --- checkpoints, backbones, weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 10, 0.5, -100], ids=["empty", "10-bytes", "half", "last-100-bytes-missing"])
def test_truncated_checkpoint_is_named(tmp_path, rd4ad_checkpoint, keep):
    data = rd4ad_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=f"cannot read checkpoint {re.escape(str(path))}"):
        dmgrd.load(path)


def test_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a dmgrd checkpoint"):
        dmgrd.load(path)


def test_resume_from_another_method_names_both(tmp_path, dmgrd_run):
    path = dmgrd_run[1]
    rd4ad = dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE)
    expected = f"{path} is not a rd4ad training checkpoint: it holds a dmgrd model"
    with pytest.raises(ValueError, match=re.escape(expected)):
        rd4ad.fit(_train_data(), steps=2, batch_size=2, progress=False, checkpoint=path, resume=True)
    assert isinstance(dmgrd.load(path), dmgrd.DMGRD)  # the generic loader takes any method's file


def test_resume_from_a_file_without_training_state_is_refused(rd4ad_checkpoint):
    model = dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE)
    expected = f"{rd4ad_checkpoint} is not a rd4ad training checkpoint: it has no training state"
    with pytest.raises(ValueError, match=re.escape(expected)):
        model.fit(_train_data(), steps=2, batch_size=2, progress=False, checkpoint=rd4ad_checkpoint, resume=True)


def test_resume_with_a_changed_config_raises(dmgrd_run):
    torch.manual_seed(0)
    changed = dmgrd.DMGRD(LITE0, weights=None, image_size=SIZE, memory_size=3, texture_count=4, ssot_points=16)
    with pytest.raises(ValueError, match=f"{re.escape(str(dmgrd_run[1]))} was trained with a different configuration"):
        changed.fit(_train_data(), steps=2, batch_size=2, progress=False, checkpoint=dmgrd_run[1], resume=True)


def _rewritten(source: Path, target: Path, **changes) -> Path:
    payload = torch.load(source, weights_only=True)
    payload.update(changes)
    torch.save(payload, target)
    return target


def test_checkpoint_from_a_newer_format_is_refused(tmp_path, rd4ad_checkpoint):
    path = _rewritten(rd4ad_checkpoint, tmp_path / "newer.pt", version=CHECKPOINT_VERSION + 1)
    expected = (f"{path} was written by a newer dmgrd (checkpoint format version {CHECKPOINT_VERSION + 1}); "
                f"this dmgrd reads format versions up to {CHECKPOINT_VERSION}")
    with pytest.raises(ValueError, match=re.escape(expected)):
        dmgrd.load(path)
    model = dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE)
    with pytest.raises(ValueError, match=re.escape(expected)):  # resuming reads it the same way
        model.fit(_train_data(), steps=1, progress=False, checkpoint=path, resume=True)


def test_checkpoint_whose_weights_do_not_fit_its_config_is_named(tmp_path, rd4ad_checkpoint):
    state = torch.load(rd4ad_checkpoint, weights_only=True)["state_dict"]
    state.pop(next(key for key in state if key.startswith("decoder.")))
    path = _rewritten(rd4ad_checkpoint, tmp_path / "edited.pt", state_dict=state)
    with pytest.raises(ValueError, match=re.escape(f"{path}: the saved weights do not fit a rd4ad model")):
        dmgrd.load(path)


def test_checkpoint_with_an_unknown_option_is_named(tmp_path, rd4ad_checkpoint):
    config = {**torch.load(rd4ad_checkpoint, weights_only=True)["config"], "warp_factor": 9}
    path = _rewritten(rd4ad_checkpoint, tmp_path / "edited.pt", config=config)
    with pytest.raises(ValueError, match=re.escape(f"{path} holds a rd4ad configuration this dmgrd cannot build")
                       + ".*warp_factor"):
        dmgrd.load(path)


class _CreatesFile:
    """Unpickling this object calls ``open(path, "w")``: code run by loading a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("container", ["torch-zip", "plain-pickle"])
def test_checkpoint_with_pickled_code_is_never_run(tmp_path, rd4ad_checkpoint, container):
    marker = tmp_path / "code-ran"
    payload = {"threshold": _CreatesFile(marker), **torch.load(rd4ad_checkpoint, weights_only=True)}
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # protocol 2: torch reads it up to the code
    with pytest.raises(ValueError, match=f"cannot read checkpoint {re.escape(str(path))}: .*never unpickles"):
        dmgrd.load(path)
    with pytest.raises(ValueError, match="never unpickles"):
        dmgrd.models.checkpoint.read_payload(path)
    assert not marker.exists()
    if container == "torch-zip":  # the file really carries code: an unsafe load runs it
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


# A save whose temporary file, after 8 MiB, reports and stalls: the test kills it there with SIGKILL.
STALLING_SAVE = """
import os, sys, time
from pathlib import Path
import torch
from dmgrd.models.checkpoint import atomic_save

class Stalling:
    def __init__(self, file):
        self.file, self.written = file, 0
    def write(self, data):
        self.written += self.file.write(data)
        if self.written > 8 << 20:
            self.file.flush()
            print("writing", flush=True)
            time.sleep(600)
        return len(data)
    def __getattr__(self, name):
        return getattr(self.file, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

real_fdopen = os.fdopen
os.fdopen = lambda *args, **kwargs: Stalling(real_fdopen(*args, **kwargs))
atomic_save({"format": "dmgrd-checkpoint", "big": torch.rand(16 << 20)}, Path(sys.argv[1]))
"""


def test_killed_save_keeps_the_old_checkpoint(tmp_path, rd4ad, images):
    path = tmp_path / "model.pt"
    rd4ad.save(path)
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(dmgrd.__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", STALLING_SAVE, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdout.readline() == b"writing\n"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".model.pt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 8 << 20  # killed in the middle of the write
    assert path.read_bytes() == before
    assert torch.equal(dmgrd.load(path)(images).anomaly_map, rd4ad(images).anomaly_map)
    rd4ad.save(path)  # the leftover breaks nothing: saving again works
    assert isinstance(dmgrd.load(path), dmgrd.RD4AD)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([leftovers[0].name, "model.pt"])


def _diverge_at_call(model, call: int, kind: str) -> None:
    """Make the ``call``-th training step (1-based) have a NaN loss, or a finite loss with NaN gradients."""
    original, calls = model.training_losses, {"n": 0}

    def training_losses(images, generator):
        losses = original(images, generator)
        calls["n"] += 1
        if calls["n"] == call:
            if kind == "nan-loss":
                losses["loss"] = losses["loss"] * float("nan")
            else:
                losses["loss"].register_hook(lambda grad: grad * float("nan"))
        return losses

    model.training_losses = training_losses


@pytest.mark.parametrize(("kind", "message"), [("nan-loss", "training diverged at step 2: loss nan"),
                                               ("nan-gradient", "training diverged within the first 3 steps")],
                         ids=["nan-loss", "nan-gradient"])
def test_divergence_never_overwrites_the_checkpoint(tmp_path, kind, message):
    torch.manual_seed(0)
    model = dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE)
    _diverge_at_call(model, 3, kind)
    path = tmp_path / "model.pt"
    with pytest.raises(FloatingPointError, match=re.escape(message)):
        model.fit(_train_data(), steps=5, batch_size=2, progress=False, checkpoint=path, checkpoint_every=1)
    loaded, extra = dmgrd.models.read_checkpoint(path)
    assert extra["train_state"]["step"] == 2  # the last good one
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    unset = {"image_threshold", "pixel_threshold", "normal_score_range"}  # NaN: not calibrated
    assert all(torch.isfinite(b).all() for name, b in loaded.named_buffers() if name not in unset)
    if kind == "nan-loss":  # stopped before the update: the parameters in memory are the checkpoint's too
        for (name, ours), theirs in zip(model.named_parameters(), loaded.parameters(), strict=True):
            assert torch.equal(ours, theirs), name


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown teacher backbone 'resnet_51'") as info:
        dmgrd.RD4AD("resnet_51", weights=None, image_size=SIZE)
    assert all(repr(name) in str(info.value) for name in BACKBONES)


def test_offline_imagenet_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(weights_module, "_reachable", lambda url: False)
    with pytest.raises(WeightsUnavailableError) as info:
        dmgrd.RD4AD("resnet18", weights="imagenet", image_size=SIZE)
    message = str(info.value)
    assert "Download resnet18-f37072fd.pth from https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"put it in {tmp_path / 'checkpoints'}" in message and 'weights="/path/to/file.pth"' in message
    assert not (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").exists()
