"""Several categories as one data set, for unified (multi-class) training: each item says its category."""

import bisect
from collections.abc import Mapping

from torch.utils.data import ConcatDataset, Dataset


class Categories(Dataset):
    """The data sets of ``datasets`` (category name -> data set) one after the other; every item is the
    underlying item with ``"category"`` added. Names keep their order (:attr:`names`)."""

    def __init__(self, datasets: Mapping[str, Dataset]):
        if not datasets:
            raise ValueError("Categories needs at least one category")
        empty = [name for name, data in datasets.items() if len(data) == 0]  # type: ignore[arg-type]
        if empty:
            raise ValueError(f"categories without items: {', '.join(empty)}")
        self.names = list(datasets)
        self.datasets = list(datasets.values())
        self._concat: ConcatDataset = ConcatDataset(self.datasets)

    def __len__(self) -> int:
        return len(self._concat)

    def category_of(self, index: int) -> str:
        """The category of item ``index`` (without reading it)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.names[bisect.bisect_right(self._concat.cumulative_sizes, index)]

    def __getitem__(self, index: int) -> dict:
        return {**self._concat[index], "category": self.category_of(index)}
