"""Regions of a layout: boxes or masks, rasterised at any attention resolution.

A box is ``(x0, y0, x1, y1)`` in fractions of the image width (x) and height (y), as in
:mod:`lossguide.data.canvas`. At a layer's h×w grid a box becomes its area coverage of each cell (1 inside,
0 outside, fractional on the border), so the same box means the same place at every resolution; a mask
[H, W] in [0, 1] is area-averaged to h×w.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _coverage(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n]: the fraction of each of n equal cells of [0, 1] that [lo, hi] covers (in cell units, so a box on
    cell edges covers whole cells exactly)."""
    j = torch.arange(n, dtype=torch.float64, device=lo.device)
    a, b = lo.double()[:, None] * n, hi.double()[:, None] * n
    return (torch.minimum(b, j + 1) - torch.maximum(a, j)).clamp(0, 1).float()


def box_map(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] area coverage of the cells of an h×w grid by boxes [B, 4] (x0, y0, x1, y1)."""
    h, w = size
    cx = _coverage(boxes[:, 0], boxes[:, 2], w)
    cy = _coverage(boxes[:, 1], boxes[:, 3], h)
    return cy[:, :, None] * cx[:, None, :]


class Region:
    """Per-sample soft regions: boxes [B or 1, 4], or a mask [B or 1, H, W] in [0, 1]."""

    def __init__(self, boxes: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if (boxes is None) == (mask is None):
            raise ValueError("a Region is boxes or a mask: pass exactly one")
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32)
            boxes = boxes[None] if boxes.ndim == 1 else boxes
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be (x0, y0, x1, y1) or [B, 4], got shape {tuple(boxes.shape)}")
            x0, y0, x1, y1 = boxes.unbind(1)
            if not (((0 <= x0) & (x0 < x1) & (x1 <= 1) & (0 <= y0) & (y0 < y1) & (y1 <= 1)).all()):
                raise ValueError(f"boxes are fractions with 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1, got {boxes.tolist()}")
        else:
            mask = torch.as_tensor(mask, dtype=torch.float32)
            mask = mask[None] if mask.ndim == 2 else mask
            if mask.ndim != 3:
                raise ValueError(f"a mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
            if mask.min() < 0 or mask.max() > 1:
                raise ValueError("mask values must lie in [0, 1]")
        self.boxes, self.mask = boxes, mask
        self._cache: dict = {}

    @property
    def batch(self) -> int:
        return (self.boxes if self.boxes is not None else self.mask).shape[0]

    def at(self, size: tuple[int, int], batch: int | None = None, device=None) -> torch.Tensor:
        """[B or 1, h, w] in [0, 1] at an h×w grid (cached per size and device)."""
        if batch is not None and self.batch not in (1, batch):
            raise ValueError(f"a region of {self.batch} samples for a batch of {batch}; pass one, or one per sample")
        key = (tuple(size), str(device))
        if key not in self._cache:
            if self.boxes is not None:
                m = box_map(self.boxes, size)
            else:
                m = F.interpolate(self.mask[:, None], size=tuple(size), mode="area")[:, 0]
            self._cache[key] = m.to(device) if device is not None else m
        return self._cache[key]


def as_region(region) -> Region:
    """A :class:`Region` from a Region, a box (x0, y0, x1, y1), boxes [B, 4] or a mask [H, W] / [B, H, W].

    A tensor whose last dimension is 4 and has at most 2 dimensions is read as boxes; pass
    ``Region(mask=m)`` for a mask that is 4 pixels wide."""
    if isinstance(region, Region):
        return region
    t = torch.as_tensor(region, dtype=torch.float32)
    if t.ndim in (1, 2) and t.shape[-1] == 4:
        return Region(boxes=t)
    return Region(mask=t)


def regions(targets: dict | Sequence) -> list[tuple[int, Region]]:
    """[(token, Region)] from ``{token: region}`` or ``[(token, region), ...]``."""
    items = targets.items() if isinstance(targets, dict) else targets
    out = [(int(k), as_region(r)) for k, r in items]
    if not out:
        raise ValueError("a layout needs at least one (token, region) target")
    return out
