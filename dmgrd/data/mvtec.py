"""MVTec AD layout reader: ``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from dmgrd.data.io import list_images, read_image, read_mask

SPLITS = ("train", "test")


class MVTecAD(Dataset):
    """One MVTec AD category. Items are dicts: ``image`` float32 [3, S, S] in [0, 1], ``mask`` float32
    [1, S, S] in {0, 1}, ``label`` 0 (good) or 1, ``path``; ``S = image_size``."""

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: int = 256,
                 mask_rule: str = ">0.5"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.category = category
        self.split = split
        self.image_size = image_size
        self.mask_rule = mask_rule
        folder = self.root / category
        if not self.root.is_dir():
            raise FileNotFoundError(f"MVTec AD root folder not found: {self.root}")
        if not folder.is_dir():
            known = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise FileNotFoundError(f"category {category!r} not found in {self.root} (found: {', '.join(known)})")
        self.samples = self._scan(folder / split, folder / "ground_truth")
        if not self.samples:
            raise FileNotFoundError(f"no images in {folder / split}")

    def _scan(self, split_dir: Path, truth_dir: Path) -> list[tuple[Path, Path | None, int]]:
        if not split_dir.is_dir():
            raise FileNotFoundError(f"split folder not found: {split_dir}")
        samples = []
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = int(defect_dir.name != "good")
            for image in list_images(defect_dir):
                mask = truth_dir / defect_dir.name / f"{image.stem}_mask.png" if label else None
                if mask is not None and not mask.is_file():
                    raise FileNotFoundError(f"ground-truth mask missing for {image}: expected {mask}")
                samples.append((image, mask, label))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path, label = self.samples[index]
        image = read_image(image_path, self.image_size)
        if mask_path is None:
            mask = torch.zeros(1, *image.shape[1:])
        else:
            mask = read_mask(mask_path, self.image_size, self.mask_rule)
        return {"image": image, "mask": mask, "label": label, "path": str(image_path)}
