"""MVTec AD layout reader: ``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``."""

from collections.abc import Collection
from pathlib import Path

from dmgrd.data.io import MaskFinder, Sample, SampleDataset, Size, category_dir, check_split, list_images


def _class_folders(split_dir: Path, split: str, normal: Collection[str]) -> list[Path]:
    """The class folders of a split, sorted; a test split must have a normal one with images (image AUROC needs
    both classes), else the error names the folder it looked for."""
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if split == "test" and not any(p.name in normal and list_images(p) for p in folders):
        found = ", ".join(p.name for p in folders) or "none"
        raise FileNotFoundError(
            f"no normal test images: expected them in {' or '.join(str(split_dir / n) for n in normal)} "
            f"(class folders found: {found}); image AUROC needs normal and defective test images"
        )
    return folders


def mvtec_layout_samples(root: Path, category: str, split: str, dataset: str,
                         normal: Collection[str] = ("good",)) -> list[Sample]:
    """Samples of ``<root>/<category>/<split>/<defect>/*``: folders named in ``normal`` are label 0, the others
    label 1 with masks ``ground_truth/<defect>/<stem>[_mask].<ext>``. Raises if nothing is found, or if the test
    split has no normal images."""
    check_split(split)
    folder = category_dir(root, category, dataset)
    split_dir = folder / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    samples = []
    for defect_dir in _class_folders(split_dir, split, normal):
        label = int(defect_dir.name not in normal)
        images = list_images(defect_dir)
        if label:
            find_mask = MaskFinder(folder / "ground_truth" / defect_dir.name)
            samples += [Sample(image, find_mask(image), label) for image in images]
        else:
            samples += [Sample(image, None, label) for image in images]
    if not samples:
        raise FileNotFoundError(f"no images in {split_dir}")
    return samples


class MVTecAD(SampleDataset):
    """One MVTec AD category. Items are dicts: ``image`` float32 [3, S, S] in [0, 1], ``mask`` float32
    [1, S, S] in {0, 1}, ``label`` 0 (good) or 1, ``path``; ``S = image_size``. The test split must have a
    ``good`` folder, and every defect image its mask."""

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: Size = 256,
                 mask_rule: str = ">0.5"):
        self.root, self.category, self.split = Path(root), category, split
        super().__init__(mvtec_layout_samples(self.root, category, split, "MVTec AD"), image_size, mask_rule)
