"""VisA reader: the MVTec-style "1cls" conversion or the raw release with its official split CSV.

Converted layout (``prepare_data.py`` of amazon-science/spot-diff): ``<root>/<category>/{train/good,
test/good, test/bad}/*.JPG`` and ``ground_truth/bad/<stem>.png`` (``<stem>_mask.png`` is accepted too).
Raw layout: ``split_csv/1cls.csv`` with columns ``object,split,label,image,mask``, paths relative to the VisA
root and labels ``normal``/``anomaly``.
"""

import csv
from pathlib import Path

from dmgrd.data.io import Sample, SampleDataset, Size, check_split
from dmgrd.data.mvtec import mvtec_layout_samples

CSV_COLUMNS = ("object", "split", "label", "image", "mask")
CSV_LABELS = {"normal": 0, "anomaly": 1}


def _read_rows(split_csv: Path) -> list[dict[str, str]]:
    try:
        with open(split_csv, newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
    except FileNotFoundError:
        raise FileNotFoundError(f"VisA split CSV not found: {split_csv}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read VisA split CSV {split_csv}: {exc}") from None
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"VisA split CSV {split_csv} lacks the columns {missing} (has {reader.fieldnames})")
    return rows


def _csv_sample(row: dict[str, str], root: Path, where: str) -> Sample:
    if row["label"] not in CSV_LABELS:
        raise ValueError(f"{where}: label must be one of {sorted(CSV_LABELS)}, got {row['label']!r}")
    label = CSV_LABELS[row["label"]]
    if label and not row["mask"]:
        raise ValueError(f"{where}: anomalous image {row['image']} has no mask")
    return Sample(root / row["image"], root / row["mask"] if label else None, label)


def csv_samples(split_csv: Path, root: Path, category: str, split: str) -> list[Sample]:
    """Samples of one object and split listed in a VisA split CSV."""
    check_split(split)
    rows = _read_rows(split_csv)
    objects = sorted({row["object"] for row in rows})
    if category not in objects:
        raise FileNotFoundError(f"category {category!r} not found in {split_csv} (found: {', '.join(objects)})")
    # Row numbers count the header as line 1, as an editor shows them.
    samples = [_csv_sample(row, root, f"{split_csv} line {line}") for line, row in enumerate(rows, start=2)
               if row["object"] == category and row["split"] == split]
    if not samples:
        raise FileNotFoundError(f"no {split} rows for {category!r} in {split_csv}")
    return samples


class VisA(SampleDataset):
    """One VisA object (items as in ``MVTecAD``). With ``split_csv`` (e.g. ``<root>/split_csv/1cls.csv``) ``root``
    is the raw VisA folder and masks count every non-zero pixel as anomalous, as the official conversion does."""

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: Size = 256,
                 mask_rule: str = ">0.5", split_csv: str | Path | None = None):
        self.root, self.category, self.split = Path(root), category, split
        if split_csv is None:
            samples = mvtec_layout_samples(self.root, category, split, "VisA")
        else:
            samples = csv_samples(Path(split_csv), self.root, category, split)
        super().__init__(samples, image_size, mask_rule, nonzero_masks=split_csv is not None)
