"""A user's own product: folders of normal images, optionally abnormal images and their masks."""

from pathlib import Path

from dmgrd.data.io import MaskFinder, Sample, SampleDataset, Size, images_in, require_dir


def folder_samples(normal_dir: Path, abnormal_dir: Path | None, mask_dir: Path | None) -> list[Sample]:
    """Normal images (label 0) then abnormal ones (label 1) with masks matched by stem in ``mask_dir``; without
    ``mask_dir`` abnormal images get all-zero masks."""
    samples = [Sample(image, None, 0) for image in images_in(normal_dir, "normal folder")]
    if abnormal_dir is None:
        if mask_dir is not None:
            raise ValueError(f"mask_dir {mask_dir} given without abnormal_dir")
        return samples
    abnormal = images_in(abnormal_dir, "abnormal folder")
    if mask_dir is None:
        return samples + [Sample(image, None, 1) for image in abnormal]
    find_mask = MaskFinder(require_dir(mask_dir, "mask folder"))
    return samples + [Sample(image, find_mask(image), 1) for image in abnormal]


class Folder(SampleDataset):
    """Every image in ``normal_dir`` is label 0, every image in ``abnormal_dir`` label 1 (items as in ``MVTecAD``).

    Masks for abnormal images are found in ``mask_dir`` by stem (``<stem>.<ext>`` or ``<stem>_mask.<ext>``, any
    image suffix); a missing one is an error. Without ``mask_dir`` abnormal images get all-zero masks.
    """

    def __init__(self, normal_dir: str | Path, abnormal_dir: str | Path | None = None,
                 mask_dir: str | Path | None = None, image_size: Size = 256, mask_rule: str = ">0.5"):
        self.normal_dir = Path(normal_dir)
        self.abnormal_dir = None if abnormal_dir is None else Path(abnormal_dir)
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        super().__init__(folder_samples(self.normal_dir, self.abnormal_dir, self.mask_dir), image_size, mask_rule)
