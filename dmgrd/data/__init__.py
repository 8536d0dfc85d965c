"""Data sets (items are dicts with ``image``, ``mask``, ``label``, ``path``) and image reading."""

from dmgrd.data.btad import BTAD
from dmgrd.data.categories import Categories
from dmgrd.data.folder import Folder
from dmgrd.data.io import read_image, read_mask
from dmgrd.data.mvtec import MVTecAD
from dmgrd.data.synthetic import Synthetic
from dmgrd.data.visa import VisA

__all__ = ["BTAD", "Categories", "Folder", "MVTecAD", "Synthetic", "VisA", "read_image", "read_mask"]
