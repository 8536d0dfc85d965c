"""The checkpoint file: one ``torch.save`` dict with a format tag and version, written atomically and read without
unpickling code. Which model a file rebuilds is :mod:`dmgrd.models.loading`'s business."""

import os
import pickle
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "dmgrd-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_save(payload: dict, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, flush it to disk, then rename: an interrupted save
    (error, kill, power loss) keeps the old file. A killed save leaves a hidden ``.<name>.*.tmp``, which
    nothing reads and which can be deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_payload(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """The raw contents of a dmgrd checkpoint, with clear errors for missing, truncated, foreign or newer files.

    Read with ``torch.load(weights_only=True)``: tensors and plain data only, so a file carrying pickled code is
    refused without running it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"cannot read checkpoint {path}: it is damaged, or holds pickled Python objects other "
                         f"than tensors and plain data, which dmgrd never unpickles (that could run code)") from None
    except Exception as exc:  # truncated or foreign files fail in many ways inside torch.load
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dmgrd checkpoint")
    version = payload.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} has an invalid checkpoint format version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer dmgrd (checkpoint format version {version}); this dmgrd "
                         f"reads format versions up to {CHECKPOINT_VERSION}: upgrade dmgrd to load it")
    return payload
