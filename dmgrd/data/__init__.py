"""Data sets (items are dicts with ``image``, ``mask``, ``label``, ``path``) and image reading."""

from dmgrd.data.io import read_image, read_mask
from dmgrd.data.mvtec import MVTecAD

__all__ = ["MVTecAD", "read_image", "read_mask"]
