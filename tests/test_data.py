"""dmgrd.data: the MVTec AD reader and image/mask reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmgrd.data import MVTecAD, read_image, read_mask

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"
needs_bottle = pytest.mark.skipif(not (ROOT / "bottle").is_dir(), reason="../shared/data/mvtec_ad/bottle not present")


@needs_bottle
def test_bottle_splits_and_items():
    train = MVTecAD(ROOT, "bottle", "train", image_size=64)
    test = MVTecAD(ROOT, "bottle", "test", image_size=96)
    assert len(train) == 209 and len(test) == 83
    labels = [label for _, _, label in test.samples]
    assert labels.count(0) == 20 and labels.count(1) == 63
    item = test[0]  # broken_large sorts first
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert item["mask"].shape == (1, 96, 96) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["label"] == 1 and item["mask"].sum() > 0 and Path(item["path"]).is_file()
    good = train[0]
    assert good["label"] == 0 and good["mask"].sum() == 0


def test_missing_root_category_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        MVTecAD(tmp_path / "nowhere", "bottle")
    (tmp_path / "cable" / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"category 'bottle' not found .*found: cable"):
        MVTecAD(tmp_path, "bottle")
    with pytest.raises(FileNotFoundError, match="no images in"):
        MVTecAD(tmp_path, "cable", "train")
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        MVTecAD(tmp_path, "cable", "test")
    with pytest.raises(ValueError, match="split must be one of"):
        MVTecAD(tmp_path, "cable", "val")


def test_missing_mask_is_named(tmp_path):
    for folder in ("good", "crack"):
        (tmp_path / "toy" / "test" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "toy" / "test" / folder / "000.png")
    with pytest.raises(FileNotFoundError, match=r"000_mask.png"):
        MVTecAD(tmp_path, "toy", "test")


def test_read_image_formats(tmp_path):
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    x = read_image(tmp_path / "g16.png")
    assert x.shape == (3, 8, 8) and torch.allclose(x[0, 7, 7], torch.tensor(63000 / 65535))
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    y = read_image(tmp_path / "rgba.png", size=4)
    assert y.shape == (3, 4, 4) and torch.allclose(y[0], torch.ones(4, 4))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken.png"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match=r"missing.png"):
        read_image(tmp_path / "missing.png")


def test_read_mask_rules_and_01_masks(tmp_path):
    values = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").flatten().tolist() == [0, 0, 1, 1]
    assert read_mask(tmp_path / "m.png", rule=">0").flatten().tolist() == [0, 1, 1, 1]
    assert read_mask(tmp_path / "m.png", rule="==1").flatten().tolist() == [0, 0, 0, 1]
    Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8)).save(tmp_path / "01.png")
    assert read_mask(tmp_path / "01.png").flatten().tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="mask rule"):
        read_mask(tmp_path / "m.png", rule="half")
