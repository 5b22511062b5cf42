"""Layout control of a cross-attention diffusion model: capture and modulation of its cross-attention maps
(:mod:`~lossguide.layout.attention`), region losses on them and the noise-aware layout loss ℓ(x_t, t)
(:mod:`~lossguide.layout.losses`), and the two-digit conditional model (:mod:`~lossguide.layout.model`)."""

from lossguide.layout.attention import AttentionControl, LayoutAttnProcessor, Modulation, layer_grid
from lossguide.layout.losses import LayoutLoss, ink_fraction, region_energy
from lossguide.layout.model import BLANK_TOKEN, NULL_TOKEN, CondDigitModel, TokenEncoder
from lossguide.layout.regions import Region, as_region, box_map

__all__ = [
    "BLANK_TOKEN",
    "NULL_TOKEN",
    "AttentionControl",
    "CondDigitModel",
    "LayoutAttnProcessor",
    "LayoutLoss",
    "Modulation",
    "Region",
    "TokenEncoder",
    "as_region",
    "box_map",
    "ink_fraction",
    "layer_grid",
    "region_energy",
]
