"""What a deployed model needs besides its graph, as JSON without torch: the input size and preprocessing, the
decision thresholds and the statistics of the normalised score. An exported ONNX file carries it in its
``metadata_props`` under :data:`METADATA_KEY` (an OpenVINO IR in its ``rt_info``); :mod:`dmgrd.infer` reads it
from there, or builds it from a checkpoint, and decides the same way for every format."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

METADATA_KEY = "dmgrd"
METADATA_VERSION = 1

# How an image becomes the model's input; the only variable part is the size (``InferenceMetadata.input_size``).
# dmgrd.infer applies exactly this and refuses metadata that asks for anything else.
PREPROCESSING = {
    "decode": "exif_transpose",        # files turned as viewers show them
    "color": "rgb",                    # grey (and grey + alpha) repeated to 3 channels, alpha dropped
    "scale": "bit_depth",              # 8-bit / 255, 16-bit (and wider integers) / 65535, floats taken in [0, 1]
    "resize": "bilinear_antialias",    # to input_size, antialiased when shrinking; values clipped to [0, 1]
    "layout": "NCHW",                  # float32 [B, 3, H, W]; the model normalises for its teacher itself
}


@dataclass(frozen=True)
class InferenceMetadata:
    """A model's inputs and decisions. ``image_threshold`` / ``pixel_threshold``: a score / map value above it is
    anomalous (None: never calibrated); ``score_min`` / ``score_max``: the range of held-out normal scores that
    :meth:`normalized_score` uses (None: not recorded)."""

    method: str
    input_size: tuple[int, int]
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    preprocessing: dict[str, str] = field(default_factory=lambda: dict(PREPROCESSING))
    version: int = METADATA_VERSION

    def __post_init__(self):
        height, width = self.input_size
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise ValueError(f"input_size must be two positive ints (H, W), got {self.input_size!r}")
        for name in ("image_threshold", "pixel_threshold", "score_min", "score_max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        if (self.score_min is None) != (self.score_max is None):
            raise ValueError("score_min and score_max are recorded together (or neither)")
        if self.score_min is not None and self.score_max is not None and self.score_min > self.score_max:
            raise ValueError(f"score_min {self.score_min} is above score_max {self.score_max}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the model") -> InferenceMetadata:
        """Parse :meth:`to_json`'s text; errors name ``source`` and say what does not fit this dmgrd."""
        try:
            data = json.loads(text)
            version = data.get("version")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{source}: its dmgrd metadata is not a JSON object: {exc}") from None
        if not isinstance(version, int) or version > METADATA_VERSION:
            raise ValueError(f"{source}: dmgrd metadata version {version!r}; this dmgrd reads versions up to "
                             f"{METADATA_VERSION}: upgrade dmgrd")
        if data.get("preprocessing") != PREPROCESSING:
            raise ValueError(f"{source}: asks for the preprocessing {data.get('preprocessing')}, which this dmgrd "
                             f"does not apply (it applies {PREPROCESSING})")
        try:
            return cls(**{**data, "input_size": tuple(data["input_size"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid dmgrd metadata: {exc}") from None

    def normalized_score(self, score: float) -> float | None:
        """``score`` on [0, 1] with the image threshold at 0.5 (anomalib's min-max style):
        ``clip(0.5 + (score - threshold) / (2 (score_max - score_min)), 0, 1)``. With thresholds from held-out
        normal images (threshold = score_max) their range maps to [0, 0.5], and a score as far above the
        threshold as that range is wide maps to 1. None without a threshold or recorded range."""
        if self.image_threshold is None or self.score_min is None or self.score_max is None:
            return None
        spread = self.score_max - self.score_min
        if spread <= 0:  # one validation score (or all equal): its own magnitude sets the scale
            spread = abs(self.image_threshold) or 1.0
        return min(max(0.5 + (score - self.image_threshold) / (2 * spread), 0.0), 1.0)
