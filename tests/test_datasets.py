"""dmgrd.data readers (VisA, BTAD, Folder) on tiny fake trees, the Synthetic data set, and their error messages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmgrd.data import BTAD, Categories, Folder, Synthetic, VisA, read_image, read_mask

HEIGHT, WIDTH = 12, 20


def _rgb(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _box(value: int = 255, height: int = HEIGHT, width: int = WIDTH, dtype=np.uint8) -> np.ndarray:
    """A mask with a 4 x 6 box of ``value`` at rows 3..6, columns 5..10."""
    mask = np.zeros((height, width), dtype=dtype)
    mask[3:7, 5:11] = value
    return mask


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _expected_mask(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array > 0).float()[None]


def _check_item(item: dict, size: tuple[int, int], label: int, path: Path) -> None:
    image, mask = item["image"], item["mask"]
    assert image.shape == (3, *size) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert mask.shape == (1, *size) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert item["label"] == label and item["path"] == str(path)
    if not label:
        assert mask.sum() == 0


# --- VisA ------------------------------------------------------------------------------------------------------------


def _visa_converted(root: Path) -> dict[str, Path]:
    """The "1cls" conversion of one object: masks named ``<stem>.png`` (the converter's) and ``<stem>_mask.png``."""
    base = root / "candle"
    files = {
        "train0": _save(base / "train/good/0001.JPG", _rgb(0)),
        "train1": _save(base / "train/good/0002.JPG", _rgb(1)),
        "good": _save(base / "test/good/0003.JPG", _rgb(2)),
        "bad0": _save(base / "test/bad/000.JPG", _rgb(3)),
        "bad1": _save(base / "test/bad/001.JPG", _rgb(4)),
    }
    _save(base / "ground_truth/bad/000.png", _box())
    _save(base / "ground_truth/bad/001_mask.png", _box()[::-1].copy())
    return files


def test_visa_converted_layout(tmp_path):
    files = _visa_converted(tmp_path)
    train = VisA(tmp_path, "candle", "train", image_size=(HEIGHT, WIDTH))
    assert [s.image for s in train.samples] == [files["train0"], files["train1"]]
    _check_item(train[1], (HEIGHT, WIDTH), 0, files["train1"])
    assert train[1]["mask"].sum() == 0
    test = VisA(tmp_path, "candle", "test", image_size=(HEIGHT, WIDTH))
    assert [s.label for s in test.samples] == [1, 1, 0]  # "bad" sorts before "good"
    first, second = test[0], test[1]
    _check_item(first, (HEIGHT, WIDTH), 1, files["bad0"])
    assert torch.equal(first["mask"], _expected_mask(_box()))
    assert torch.equal(second["mask"], _expected_mask(_box()[::-1].copy()))
    assert test[2]["label"] == 0 and test[2]["mask"].sum() == 0
    small = VisA(tmp_path, "candle", "test", image_size=8)[0]
    assert small["image"].shape == (3, 8, 8) and small["mask"].shape == (1, 8, 8)
    assert 0 < small["mask"].sum() < 64 and set(small["mask"].unique().tolist()) == {0.0, 1.0}


def _visa_raw(root: Path) -> Path:
    """Raw VisA files for two objects and a 1cls CSV; the candle mask is a label mask with values {0, 2}."""
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i, split in enumerate(("train", "train", "test")):
            image = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(root / image, _rgb(i))
            rows.append(f"{obj},{split},normal,{image},")
        image, mask = f"{obj}/Data/Images/Anomaly/000.JPG", f"{obj}/Data/Masks/Anomaly/000.png"
        _save(root / image, _rgb(9))
        _save(root / mask, _box(2))
        rows.append(f"{obj},test,anomaly,{image},{mask}")
    csv = root / "split_csv" / "1cls.csv"
    csv.parent.mkdir()
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_visa_split_csv(tmp_path):
    csv = _visa_raw(tmp_path)
    train = VisA(tmp_path, "candle", "train", image_size=(HEIGHT, WIDTH), split_csv=csv)
    assert [s.image for s in train.samples] == [tmp_path / f"candle/Data/Images/Normal/{i:04d}.JPG" for i in (0, 1)]
    assert [s.label for s in train.samples] == [0, 0]
    test = VisA(tmp_path, "candle", "test", image_size=(HEIGHT, WIDTH), split_csv=csv)
    assert [s.label for s in test.samples] == [0, 1]
    anomaly = test[1]
    _check_item(anomaly, (HEIGHT, WIDTH), 1, tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    assert torch.equal(anomaly["mask"], _expected_mask(_box()))  # label value 2 counts as anomalous
    assert read_mask(tmp_path / "candle/Data/Masks/Anomaly/000.png").sum() == 0  # the plain rule would lose it


def test_visa_csv_errors(tmp_path):
    csv = _visa_raw(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"category 'pipe_fryum' not found .*found: candle, pcb1"):
        VisA(tmp_path, "pipe_fryum", "test", split_csv=csv)
    with pytest.raises(FileNotFoundError, match="split CSV not found"):
        VisA(tmp_path, "candle", split_csv=tmp_path / "nothing.csv")
    broken = tmp_path / "broken.csv"
    broken.write_text("object,split,label,image\ncandle,test,anomaly,a.JPG\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['mask'\]"):
        VisA(tmp_path, "candle", "test", split_csv=broken)
    no_mask = tmp_path / "no_mask.csv"
    no_mask.write_text("object,split,label,image,mask\ncandle,test,normal,n.JPG,\ncandle,test,anomaly,a.JPG,\n")
    with pytest.raises(ValueError, match=r"no_mask.csv line 3: anomalous image a.JPG has no mask"):
        VisA(tmp_path, "candle", "test", split_csv=no_mask)
    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text("object,split,label,image,mask\ncandle,test,defect,a.JPG,m.png\n")
    with pytest.raises(ValueError, match="label must be one of"):
        VisA(tmp_path, "candle", "test", split_csv=bad_label)


# --- BTAD ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("category", "image_suffix", "mask_suffix", "normal"), [
    ("01", ".bmp", ".png", "ok"),
    ("02", ".png", ".png", "good"),
    ("03", ".bmp", ".bmp", "ok"),
    ("03", ".bmp", ".bmp", "good"),
])
def test_btad_classes_and_normal_names(tmp_path, category, image_suffix, mask_suffix, normal):
    base = tmp_path / category
    train_image = _save(base / "train" / normal / f"0000{image_suffix}", _rgb(0))
    _save(base / "test" / normal / f"0001{image_suffix}", _rgb(1))
    bad = _save(base / "test/ko" / f"0002{image_suffix}", _rgb(2))
    _save(base / "ground_truth/ko" / f"0002{mask_suffix}", _box())
    train = BTAD(tmp_path, category, "train", image_size=(HEIGHT, WIDTH))
    assert len(train) == 1
    item = train[0]
    _check_item(item, (HEIGHT, WIDTH), 0, train_image)
    assert torch.allclose(item["image"], torch.from_numpy(_rgb(0)).permute(2, 0, 1) / 255)  # lossless formats
    test = BTAD(tmp_path, category, "test", image_size=(HEIGHT, WIDTH))
    bad_index = 0 if normal == "ok" else 1  # folders are read in sorted order: good < ko < ok
    assert [s.label for s in test.samples] == ([1, 0] if normal == "ok" else [0, 1])
    _check_item(test[bad_index], (HEIGHT, WIDTH), 1, bad)
    assert torch.equal(test[bad_index]["mask"], _expected_mask(_box()))
    assert test[1 - bad_index]["label"] == 0 and test[1 - bad_index]["mask"].sum() == 0


def test_btad_missing_category_split_and_mask(tmp_path):
    _save(tmp_path / "01/train/ok/0000.bmp", _rgb(0))
    _save(tmp_path / "02/train/ok/0000.png", _rgb(0))
    with pytest.raises(FileNotFoundError, match=r"category '04' not found .*found: 01, 02"):
        BTAD(tmp_path, "04")
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        BTAD(tmp_path, "01", "test")
    _save(tmp_path / "01/test/ok/0006.bmp", _rgb(1))
    bad = _save(tmp_path / "01/test/ko/0007.bmp", _rgb(1))
    with pytest.raises(FileNotFoundError, match=re.escape(f"ground-truth mask missing for {bad}")):
        BTAD(tmp_path, "01", "test")


# --- Folder ----------------------------------------------------------------------------------------------------------


def _formats(folder: Path) -> dict[str, tuple[Path, torch.Tensor]]:
    """One image per format with the RGB tensor it must read as."""
    gray16 = np.random.default_rng(0).integers(0, 65536, (HEIGHT, WIDTH)).astype(np.uint16)
    gray8 = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    rgba = np.random.default_rng(2).integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgb = _rgb(3)
    return {
        "gray16": (_save(folder / "a_gray16.png", gray16), torch.from_numpy(gray16 / 65535).float().expand(3, -1, -1)),
        "gray8": (_save(folder / "b_gray8.png", gray8), torch.from_numpy(gray8 / 255).float().expand(3, -1, -1)),
        "rgba": (_save(folder / "c_rgba.png", rgba), torch.from_numpy(rgba[..., :3] / 255).float().permute(2, 0, 1)),
        "bmp": (_save(folder / "d_rgb.bmp", rgb), torch.from_numpy(rgb / 255).float().permute(2, 0, 1)),
    }


def test_folder_normal_only_reads_every_format(tmp_path):
    formats = _formats(tmp_path / "normal")
    data = Folder(tmp_path / "normal", image_size=(HEIGHT, WIDTH))
    assert len(data) == 4
    for item, (path, expected) in zip(data, formats.values(), strict=True):
        _check_item(item, (HEIGHT, WIDTH), 0, path)
        assert torch.allclose(item["image"], expected, atol=1e-6)
        assert item["mask"].sum() == 0


def test_folder_abnormal_without_masks_gets_zero_masks(tmp_path):
    _save(tmp_path / "normal/n.png", _rgb(0))
    bad = _save(tmp_path / "bad/x.jpg", _rgb(1))
    data = Folder(tmp_path / "normal", tmp_path / "bad", image_size=16)
    assert [s.label for s in data.samples] == [0, 1]
    _check_item(data[1], (16, 16), 1, bad)
    assert data[1]["mask"].sum() == 0


def test_folder_masks_by_stem_any_suffix(tmp_path):
    _save(tmp_path / "normal/n.png", _rgb(0))
    first = _save(tmp_path / "bad/a.jpg", _rgb(1))
    second = _save(tmp_path / "bad/b.PNG", _rgb(2))
    _save(tmp_path / "masks/a.png", _box())
    _save(tmp_path / "masks/b_mask.bmp", _box(1))  # a {0, 1} mask
    data = Folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks", image_size=(HEIGHT, WIDTH))
    assert [s.mask for s in data.samples] == [None, tmp_path / "masks/a.png", tmp_path / "masks/b_mask.bmp"]
    for index, path in ((1, first), (2, second)):
        _check_item(data[index], (HEIGHT, WIDTH), 1, path)
        assert torch.equal(data[index]["mask"], _expected_mask(_box()))


def test_folder_mask_errors(tmp_path):
    _save(tmp_path / "normal/n.png", _rgb(0))
    _save(tmp_path / "bad/a.png", _rgb(1))
    lonely = _save(tmp_path / "bad/c.png", _rgb(2))
    _save(tmp_path / "masks/a.png", _box())
    with pytest.raises(FileNotFoundError, match=re.escape(f"ground-truth mask missing for {lonely}")):
        Folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks")
    lonely.unlink()
    _save(tmp_path / "masks/a_mask.png", _box())
    with pytest.raises(ValueError, match=r"several masks for .*a.png"):
        Folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks")
    with pytest.raises(ValueError, match="without abnormal_dir"):
        Folder(tmp_path / "normal", mask_dir=tmp_path / "masks")
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        Folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "nowhere")


# --- robustness catalogue --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated"], ids=["empty", "corrupt"])
def test_unreadable_image_files_are_named(tmp_path, content):
    _save(tmp_path / "normal/fine.png", _rgb(0))
    (tmp_path / "normal/zz.png").write_bytes(content)
    data = Folder(tmp_path / "normal")
    data[0]
    with pytest.raises(ValueError, match=r"cannot read image .*zz.png"):
        data[1]


def test_corrupt_mask_is_named(tmp_path):
    _save(tmp_path / "toy/test/ok/0001.png", _rgb(1))
    _save(tmp_path / "toy/test/ko/0000.png", _rgb(0))
    (tmp_path / "toy/ground_truth/ko").mkdir(parents=True)
    (tmp_path / "toy/ground_truth/ko/0000.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*ground_truth/ko/0000.png"):
        BTAD(tmp_path, "toy", "test")[0]


def test_file_vanished_after_listing(tmp_path):
    path = _save(tmp_path / "normal/n.png", _rgb(0))
    data = Folder(tmp_path / "normal")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        data[0]


def test_mask_size_mismatch_names_both_files_and_sizes(tmp_path):
    image = _save(tmp_path / "candle/test/bad/000.JPG", _rgb(0))
    mask = _save(tmp_path / "candle/ground_truth/bad/000.png", _box(height=HEIGHT + 1))
    _save(tmp_path / "candle/test/good/001.JPG", _rgb(1))
    data = VisA(tmp_path, "candle", "test", image_size=8)
    expected = f"mask {mask} is {WIDTH}x{HEIGHT + 1} (WxH) but its image {image} is {WIDTH}x{HEIGHT}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        data[0]


def test_empty_missing_and_non_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images in normal folder .*empty"):
        Folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"normal folder not found: .*nowhere"):
        Folder(tmp_path / "nowhere")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"normal folder is not a folder: .*file.txt"):
        Folder(not_a_folder)
    with pytest.raises(NotADirectoryError, match=r"VisA root folder is not a folder"):
        VisA(not_a_folder, "candle")
    with pytest.raises(FileNotFoundError, match=r"BTAD root folder not found"):
        BTAD(tmp_path / "nowhere", "01")
    _save(tmp_path / "normal/n.png", _rgb(0))
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images in abnormal folder .*bad"):
        Folder(tmp_path / "normal", tmp_path / "bad")
    (tmp_path / "btad/01/train/ok").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images in"):
        BTAD(tmp_path / "btad", "01")


def test_directory_named_like_an_image_is_skipped_and_unreadable(tmp_path):
    _save(tmp_path / "normal/n.png", _rgb(0))
    (tmp_path / "normal/folder.png").mkdir()
    data = Folder(tmp_path / "normal")
    assert len(data) == 1
    with pytest.raises(ValueError, match=r"cannot read image .*folder.png"):
        read_image(tmp_path / "normal/folder.png")


def test_bad_arguments(tmp_path):
    _save(tmp_path / "normal/n.png", _rgb(0))
    with pytest.raises(ValueError, match="mask rule must be one of"):
        Folder(tmp_path / "normal", mask_rule="half")
    _visa_converted(tmp_path / "visa")
    with pytest.raises(ValueError, match="split must be one of"):
        VisA(tmp_path / "visa", "candle", "val")
    with pytest.raises(FileNotFoundError, match=r"category 'pcb1' not found .*found: candle"):
        VisA(tmp_path / "visa", "pcb1")


# --- Synthetic -------------------------------------------------------------------------------------------------------

CATEGORIES = ("texture", "object")


@pytest.mark.parametrize("category", CATEGORIES)
def test_synthetic_deterministic_per_item(category):
    first = Synthetic("test", category, seed=3, num_test=8)
    second = Synthetic("test", category, seed=3, num_test=8)
    for index in (5, 0, 3):  # any order, any instance
        a, b = first[index], second[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["label"] == b["label"] and a["path"] == b["path"]
    assert torch.equal(first[-1]["image"], first[7]["image"])
    other = Synthetic("test", category, seed=4, num_test=8)
    assert not torch.equal(first[0]["image"], other[0]["image"])
    assert not torch.equal(first[0]["image"], first[2]["image"])  # items vary
    train = Synthetic("train", category, seed=3)
    assert not torch.equal(train[0]["image"], first[0]["image"])  # splits draw differently


@pytest.mark.parametrize("category", CATEGORIES)
def test_synthetic_items_and_balanced_labels(category):
    test = Synthetic("test", category, image_size=(48, 40), num_test=10)
    labels = []
    for index in range(len(test)):
        item = test[index]
        assert item["image"].shape == (3, 48, 40) and item["image"].dtype == torch.float32
        assert item["image"].min() >= 0 and item["image"].max() <= 1
        assert item["mask"].shape == (1, 48, 40) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert (item["mask"].sum() > 0) == bool(item["label"])
        labels.append(item["label"])
    assert labels.count(1) == labels.count(0) == 5
    train = Synthetic("train", category, num_train=6)
    assert len(train) == 6 and all(item["label"] == 0 and item["mask"].sum() == 0 for item in train)


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_masks_are_exactly_the_changed_pixels(category, seed):
    low, high = 0.02, 0.1
    data = Synthetic("test", category, seed=seed, num_test=16, defect_area=(low, high))
    pixels = 64 * 64
    for index in range(len(data)):
        item, clean = data[index], data.render(index, defect=False)
        assert clean["label"] == 0 and clean["mask"].sum() == 0
        changed = item["image"] != clean["image"]
        assert torch.equal(changed.any(0), item["mask"][0].bool())
        if not item["label"]:
            continue
        mask = item["mask"][0].bool()
        assert changed[:, mask].all()  # every channel moves ...
        # The change is by construction (the smallest stain shift, 0.3 x 0.4), the area a rounded pixel count: over 20
        # seeds x 8 defects per category, changes of at least 0.126 and areas 0.0205-0.0996.
        assert (item["image"] - clean["image"]).abs()[:, mask].min() >= 0.12 - 1e-6  # ... visibly
        assert low - 0.5 / pixels <= mask.float().mean() <= high + 0.5 / pixels
        if category == "object":  # on the object, never on the plain background
            background = clean["image"][:, :1, :1]
            assert (clean["image"] != background).any(0)[mask].all()


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        Synthetic("val")
    with pytest.raises(ValueError, match="category must be one of"):
        Synthetic(category="fabric")
    with pytest.raises(ValueError, match="defect_area"):
        Synthetic(defect_area=(0.2, 0.1))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        Synthetic(image_size=(64, 8))
    with pytest.raises(IndexError, match="out of range"):
        Synthetic("test", num_test=4)[4]


def test_categories_concatenate_and_name_each_item():
    texture, objects = Synthetic("test", "texture", 32, num_test=3), Synthetic("test", "object", 32, num_test=2)
    both = Categories({"t": texture, "o": objects})
    assert len(both) == 5 and both.names == ["t", "o"]
    assert [both.category_of(i) for i in range(5)] == ["t", "t", "t", "o", "o"]
    item = both[3]
    assert item["category"] == "o" and item["path"] == objects[0]["path"]
    assert torch.equal(item["image"], objects[0]["image"]) and item["label"] == objects[0]["label"]
    with pytest.raises(IndexError, match="out of range"):
        both.category_of(5)
    with pytest.raises(ValueError, match="at least one category"):
        Categories({})
    with pytest.raises(ValueError, match="without items: e"):
        Categories({"t": texture, "e": torch.utils.data.TensorDataset(torch.zeros(0))})
