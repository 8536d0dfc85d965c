"""Rebuilding a model from its checkpoint: the method's class from the registry, its saved configuration, then
its weights and data-built state (:mod:`dmgrd.models.state`) checked against what the class declares."""

import math
from pathlib import Path

import torch

from dmgrd.models.base import METHODS, AnomalyModel
from dmgrd.models.checkpoint import read_payload
from dmgrd.models.state import data_buffers

# Data-built buffers added after checkpoints recorded theirs, and their value in files without them (not set).
ADDED_LATER = {"normal_score_range": lambda: torch.full((2,), math.nan)}


def read_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> tuple[AnomalyModel, dict]:
    """The model saved at ``path`` (in eval mode) and the checkpoint's other entries.

    Read by :func:`read_payload`; errors name the file when its method, configuration or weights do not fit."""
    payload = read_payload(path, map_location)
    method = payload.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"{path} holds an unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[method]
    saved = payload.pop("config")
    config = {**saved, "betas": tuple(saved["betas"]), "weights": None}  # teacher weights are in the state dict
    if isinstance(config["image_size"], list):
        config["image_size"] = tuple(config["image_size"])
    try:
        model = cls(config=cls.config_class(**config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} holds a {method} configuration this dmgrd cannot build: {exc}") from None
    declared = [name for name, _ in data_buffers(model)]
    state = _with_decision_state(payload.pop("state_dict"), payload)
    saved_state = payload.pop("data_state", declared)  # files from before the declaration hold the same buffers
    saved_state = [*saved_state, *(set(ADDED_LATER) - set(saved_state))]
    if sorted(saved_state) != sorted(declared):
        raise ValueError(f"{path}: its data-built buffers {sorted(saved_state)} are not those of this dmgrd's "
                         f"{method} model {sorted(declared)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the saved weights do not fit a {method} model of the saved configuration: "
                         f"{exc}") from None
    model.config.weights = saved["weights"]
    model.category_thresholds = payload.pop("category_thresholds", {})
    model.eval()
    if map_location is not None:
        model.to(map_location)
    return model, payload


def _with_decision_state(state: dict, payload: dict) -> dict:
    """``state`` with the threshold buffers and those of :data:`ADDED_LATER`; files written before thresholds
    were model state keep them in a ``"thresholds"`` entry (or have none: NaN, not set)."""
    missing = {name: value() for name, value in ADDED_LATER.items() if name not in state}
    if "image_threshold" not in state:
        stored = payload.get("thresholds") or {}
        missing.update({f"{kind}_threshold": torch.tensor(float(stored.get(kind, math.nan)))
                        for kind in ("image", "pixel")})
    return {**state, **missing}


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> AnomalyModel:
    """Rebuild a model saved with :meth:`AnomalyModel.save`."""
    return read_checkpoint(path, map_location)[0]
