"""Style transforms of digit images in [−1, 1] (ink bright, background −1), for fine-tuning a copy of a model on
restyled data (:mod:`lossguide.training.cond_ddpm` ``--style``).

- :func:`thicken`: grey-scale dilation of the ink.

:data:`STYLES` names them for the command line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def thicken(x: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Grey-scale dilation (x ⊕ B)(p) = max_{|q|∞ ≤ r} x(p + q) of images [B, C, H, W] or [C, H, W] by a
    (2r+1)×(2r+1) square: every pixel takes its neighbourhood's brightest ink, so strokes grow by r pixels on each
    side; values stay in the input's range (a max of them)."""
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be an integer ≥ 0, got {radius}")
    radius = int(radius)
    if x.ndim not in (3, 4):
        raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    if radius == 0:
        return x.clone()
    batched = x if x.ndim == 4 else x[None]
    out = F.max_pool2d(batched, kernel_size=2 * radius + 1, stride=1, padding=radius)  # pads with −inf
    return out if x.ndim == 4 else out[0]


#: style name (``--style``) → transform of a batch [B, C, H, W] in [−1, 1]
STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"thick": thicken}
