"""Pseudo-anomaly synthesis, one module per generator: Perlin masks (:mod:`~dmgrd.synthesis.perlin`), Fourier
mixing and blends (:mod:`~dmgrd.synthesis.fourier`), procedural textures (:mod:`~dmgrd.synthesis.textures`),
thin polylines (:mod:`~dmgrd.synthesis.lines`), DM-GRD's combination of them (:mod:`~dmgrd.synthesis.anomalies`),
DRD's self cut-paste (:mod:`~dmgrd.synthesis.cutpaste`) and RD++'s simplex-noise patches
(:mod:`~dmgrd.synthesis.simplex`).

Every random draw comes from an explicit ``torch.Generator`` on the generator's device; the per-pixel work is
batched torch on the images' device, so the same seed gives the same draws on a CPU or a GPU.
"""

from dmgrd.synthesis.anomalies import SHAPES, AnomalySynthesizer
from dmgrd.synthesis.cutpaste import color_distance, cutpaste_sides, self_cutpaste
from dmgrd.synthesis.fourier import BLEND_MODES, blend, fourier_mix
from dmgrd.synthesis.lines import polyline_mask, rasterize_polylines
from dmgrd.synthesis.perlin import perlin_mask, perlin_noise, rotate_maps
from dmgrd.synthesis.simplex import fractal_simplex3, simplex_noise3, simplex_patch, simplex_permutations
from dmgrd.synthesis.textures import procedural_textures

__all__ = [
    "BLEND_MODES", "SHAPES", "AnomalySynthesizer", "blend", "color_distance", "cutpaste_sides", "fourier_mix",
    "fractal_simplex3", "perlin_mask", "perlin_noise", "polyline_mask", "procedural_textures", "rasterize_polylines",
    "rotate_maps", "self_cutpaste", "simplex_noise3", "simplex_patch", "simplex_permutations",
]
