"""Image sizes as ``(H, W)``, without torch (the standalone inferencer uses them too); :mod:`dmgrd.layout`
re-exports them."""

from collections.abc import Sequence

Size = int | tuple[int, int]


def size_pair(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair of positive ints; ``name`` is the argument in the error."""
    if isinstance(size, int):
        size = (size, size)
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair (H, W), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {(height, width)}")
    return height, width


def parse_size(text: str) -> int | tuple[int, int]:
    """An image size from the command line: ``"256"`` (square) or ``"640x256"`` (height x width)."""
    height, sep, width = text.lower().partition("x")
    try:
        return size_pair((int(height), int(width)), "image size") if sep else size_pair(int(height))[0]
    except ValueError:
        raise ValueError(f"image size must be N or HxW with positive integers, got {text!r}") from None
