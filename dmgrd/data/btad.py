"""BTAD reader: ``<root>/<category>/{train/ok, test/ok, test/ko}/*`` with ``ground_truth/ko/<stem>.<ext>``.

Classes ``01`` (bmp images, png masks), ``02`` (png, png) and ``03`` (bmp, bmp). ``ok`` may be renamed ``good``
(as DM-GRD expects); both names are accepted.
"""

from pathlib import Path

from dmgrd.data.io import SampleDataset, Size
from dmgrd.data.mvtec import mvtec_layout_samples

NORMAL_FOLDERS = ("ok", "good")


class BTAD(SampleDataset):
    """One BTAD class (items as in ``MVTecAD``)."""

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: Size = 256,
                 mask_rule: str = ">0.5"):
        self.root, self.category, self.split = Path(root), category, split
        samples = mvtec_layout_samples(self.root, category, split, "BTAD", normal=NORMAL_FOLDERS)
        super().__init__(samples, image_size, mask_rule)
